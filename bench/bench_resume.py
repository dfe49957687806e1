"""Kill -9 at random moments of ``userip run``, rerun the same command, compare with an uninterrupted run.

1. Reference: ``userip run`` once, uninterrupted, in a fresh run folder (its wall time T).
2. ``--kills`` times: ``userip run`` in a fresh folder, SIGKILLed a random delay after it created its run
   folder (after Python's start and imports), drawn uniformly from (0, T - S) (``--seed``; S: the reference's
   start-up time), so kills land in prepare, the offline LM, the profile stage, the bank write or CTR
   training; then the same command again, to the end.
3. Each rerun's artifacts must equal the reference's bit for bit: soft tokens, bank codes and codebooks, every
   CTR model's test metrics (``ctr/*/metrics.json``) and ``results/results.csv``.

    python bench/bench_resume.py                 # the synthetic default (several minutes per run)
    python bench/bench_resume.py --tiny          # 60 users, 2 profile epochs, 1 CTR seed (seconds per run)

Ends with ``RESULT kills=... equal=... mismatched=... stages=... finished_before_kill=... ref_wall_s=...
wall_s=...`` (``stages``: how many kills came in each stage, by what the run had written; ``start``: the run
folder only; ``finished_before_kill``: runs that ended before their kill moment, not counted as kills, after
which moments are drawn from a shorter span; ``mismatched`` must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from userip.feature_bank import FeatureBank

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = """\
source_options: {num_users: 60, num_items: 24}
profile:
  offline_lm: {max_steps: 5, hidden_size: 32, num_layers: 1}
  train: {lr: 0.02, num_epochs: 2, batch_size: 16, progress: false, checkpoint_every: 2}
  quantization: {kmeans_init_samples: 48}
trainer: {lr: 0.01, max_epochs: 3, min_epochs: 0, patience: 1}
seeds: [0]
"""


def _command(run_dir: Path, config: Path | None) -> list[str]:
    args = [sys.executable, "-m", "userip.cli", "run", "--run-dir", str(run_dir)]
    return args + (["--config", str(config)] if config else [])


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _run(run_dir: Path, config: Path | None) -> tuple[float, float]:
    """``userip run`` to the end: (wall time, seconds until it created the run folder: Python's start and
    imports, where a kill tests nothing of ours)."""
    start, started = time.perf_counter(), None
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(_command(run_dir, config), env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None:
            if started is None and run_dir.exists():
                started = time.perf_counter() - start
            time.sleep(0.05)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read()[-3000:]
            raise SystemExit(f"userip run failed in {run_dir} (exit {proc.returncode}):\n{tail}")
    wall = time.perf_counter() - start
    return wall, wall if started is None else started


def _killed_run(run_dir: Path, config: Path | None, delay: float) -> bool:
    """Start ``userip run`` and SIGKILL it ``delay`` s after it created its run folder (start-up and imports
    take from a few seconds to half a minute on a loaded machine, and a kill there tests nothing of ours);
    False when it had finished before."""
    proc = subprocess.Popen(
        _command(run_dir, config), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while not run_dir.exists() and proc.poll() is None:
        time.sleep(0.02)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _stage_reached(run_dir: Path) -> str:
    """What the killed run had written: the last stage it got into."""
    marks = [
        ("ctr", run_dir / "ctr"),
        ("bank", run_dir / "bank" / "report.json"),
        ("profile", run_dir / "profile"),
        ("offline_lm", run_dir / "lm"),
        ("prepare", run_dir / "data"),
    ]
    return next((name for name, path in marks if path.exists()), "start")


def differences(run: Path, ref: Path) -> list[str]:
    """What differs between two finished runs' artifacts (empty: bit-identical)."""
    out = []
    got = load_file(str(run / "profile" / "soft_tokens.safetensors"))["soft_tokens"]
    want = load_file(str(ref / "profile" / "soft_tokens.safetensors"))["soft_tokens"]
    if not torch.equal(got, want):
        out.append(f"soft tokens (max diff {(got - want).abs().max().item():.3g})")
    bank, ref_bank = FeatureBank.load(run / "bank"), FeatureBank.load(ref / "bank")
    if not np.array_equal(bank.codes, ref_bank.codes):
        out.append(f"bank codes ({int((bank.codes != ref_bank.codes).any(axis=1).sum())} users)")
    if not all(np.array_equal(a, b) for a, b in zip(bank.codebooks, ref_bank.codebooks)):
        out.append("codebooks")
    for metrics in sorted((ref / "ctr").glob("*/metrics.json")):
        mine = run / "ctr" / metrics.parent.name / "metrics.json"
        want_test = json.loads(metrics.read_text())["test"]
        if not mine.exists() or json.loads(mine.read_text())["test"] != want_test:
            out.append(f"ctr/{metrics.parent.name} test metrics")
    if (run / "results" / "results.csv").read_bytes() != (ref / "results" / "results.csv").read_bytes():
        out.append("results/results.csv")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long config instead of the default")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        config = None
        if args.tiny:
            config = root / "tiny.yaml"
            config.write_text(TINY_YAML)
        ref_wall, ref_start = _run(root / "ref", config)
        print(f"reference: {ref_wall:.1f} s ({ref_start:.1f} s to start)", flush=True)
        rng = random.Random(args.seed)
        kills = equal = mismatched = missed = 0
        stages: dict[str, int] = {}
        horizon = ref_wall - ref_start  # kill moments: (0, horizon) after the run folder appeared
        while kills < args.kills and missed < 3 * args.kills:
            run_dir = root / f"kill-{kills}-{missed}"
            delay = rng.uniform(0.0, horizon)
            if not _killed_run(run_dir, config, delay):  # a lighter load than the reference's: draw again
                missed += 1
                horizon = 0.9 * delay
                print(f"finished before the kill at {delay:.1f} s; horizon now {horizon:.1f} s", flush=True)
                continue
            stage = _stage_reached(run_dir)
            stages[stage] = stages.get(stage, 0) + 1
            rerun, _ = _run(run_dir, config)
            diff = differences(run_dir, root / "ref")
            kills, equal, mismatched = kills + 1, equal + (not diff), mismatched + bool(diff)
            verdict = "equal" if not diff else "DIFFERENT: " + ", ".join(diff)
            print(f"kill {kills}: at {delay:.1f} s ({stage}); rerun {rerun:.1f} s; {verdict}", flush=True)
    print(
        f"RESULT kills={kills} equal={equal} mismatched={mismatched} "
        f"stages={','.join(f'{k}:{v}' for k, v in sorted(stages.items()))} finished_before_kill={missed} "
        f"ref_wall_s={ref_wall:.1f} wall_s={time.perf_counter() - start:.0f}"
    )


if __name__ == "__main__":
    main()
