"""Start-up memory of one rank of the distributed profile stage as the total number of users grows.

    python bench/bench_shard_startup.py [--users 200000,2000000] [--range 50000] [--work DIR]

For each size a synthetic data set is prepared (about 7 interactions per user, no reviews; kept in
``--work`` and reused), then a fresh process does what a rank does at start-up for the users
``[0, --range)``: the per-user example counts (one row group at a time) and the bounds, its row groups only
(``load_user_shard``), its users' targets tokenized (``build_examples``), the objective's sampler
(``build_aux``). Its own rows are the same number at every size, so what grows is what a rank holds for the
total number of users (the id index). Peak RSS is ``ru_maxrss`` of that process (Python, torch and the
tokenizer included); the offline LM's tokenizer is the one ``bench_scale`` pre-trains.

Also reported: ``held_mb``, the resident memory the start-up added (after minus before; the peak of a
small range can stay at the imports' own peak). Ends with ``RESULT startup_peak_mb_<U>=...
startup_held_mb_<U>=... ratio=...`` (ratio of the peaks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def resident_mb() -> float:
    """Resident memory now (Linux /proc), MB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(data: Path, lm: str, lo: int, hi: int) -> None:
    import resource

    from userip.data.schema import Dataset
    from userip.data.shards import load_user_shard, profile_example_weights
    from userip.profile.bank import build_aux
    from userip.profile.distributed import shard_bounds_from_counts
    from userip.profile.lm import load_tokenizer
    from userip.profile.stage import ProfileStageConfig
    from userip.prompts import PromptBuilder, build_examples

    config = ProfileStageConfig()
    builder = PromptBuilder(load_tokenizer(lm), config.prompt)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = resident_mb()
    num_users = int(Dataset.read_manifest(data)["counts"]["users"])
    weights = profile_example_weights(data, num_users, review=False)
    shard_bounds_from_counts(weights, 2)
    del weights
    shard = load_user_shard(data, lo, hi)
    examples = build_examples(shard, builder)
    build_aux(shard, config.prompt.profiles, 64, config.quantization)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held = resident_mb() - before
    print(json.dumps({"users": num_users, "range": hi - lo, "examples": len(examples), "base_mb": base,
                      "peak_mb": peak, "held_mb": held, "row_groups_read": shard.row_groups_read,
                      "rows": len(shard.interactions)}))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", default="200000,2000000")
    p.add_argument("--range", type=int, default=50_000)
    p.add_argument("--work", default=None)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        data, lm, lo, hi = args.child
        child(Path(data), lm, int(lo), int(hi))
        return
    from bench_scale import build_lm
    from userip.data.prepare import prepare_to_run_dir

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_shard_startup_"))
    lm = build_lm(work / "seed") if not (work / "seed" / "lm").exists() else None
    if lm is None:
        lm = str(next((work / "seed" / "lm").glob("offline-*")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    result = {}
    peaks = []
    for users in [int(u) for u in args.users.split(",")]:
        run = work / f"data{users}"
        if not (run / "data" / "manifest.json").exists():
            opts = {"num_users": users, "num_items": 2000, "mean_interactions": 6.0, "min_interactions": 4,
                    "with_reviews": False}  # fmt: skip
            prepare_to_run_dir(run, "synthetic", opts)
        cmd = [sys.executable, __file__, "--child", str(run / "data"), lm, "0", str(args.range)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        record = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(record), flush=True)
        tag = f"{users // 1000}k" if users < 10**6 else f"{users // 10**6}m"
        result[f"startup_peak_mb_{tag}"] = record["peak_mb"]
        result[f"startup_held_mb_{tag}"] = record["held_mb"]
        peaks.append(record["peak_mb"])
    result["ratio"] = max(peaks) / min(peaks)
    fields = [f"{k}={v:.4g}" for k, v in result.items()]
    print("RESULT " + " ".join(fields) + f" measured=one_rank_startup_users_0_{args.range}_peak_rss")


if __name__ == "__main__":
    main()
