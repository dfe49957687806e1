"""Scale benchmark of the distributed profile stage (torch.distributed, gloo, CPU) and of a large Redis bank.

    python bench/bench_scale.py [--users 100000,1000000] [--steps 8] [--batch-size 64] \
        [--redis-users 10000000] [--from-data] [--hidden 64] [--worker-timeout 900]

Profile part: the offline LM's architecture (a small Llama of hidden size ``--hidden``, 2 layers, pre-trained
for a few steps on a 300-user synthetic set: its weights do not matter for speed or memory) and synthetic
users at each size in ``--users``. Each rank builds only its own shard (contiguous user range): its rows of
the soft-token table (``shard_soft_token_table``), their RowAdam state, its users' examples (random
24-40-token targets, CSR) and interactions, and trains with the real ``ShardTrainer`` + ``ShardObjective``
(DDP over codebooks and surrogate) for ``--steps`` measured steps after 2 warm-up steps, under ``torchrun
--standalone``.
Reported per rank: peak RSS (``resource.getrusage``), the shard's own bytes (table + Adam moments + step
counts + example and interaction arrays), and their difference ("beyond the shard"); users/s = global batch
users per second. Throughput with 1 and 2 ranks at the smallest size. (On a 2-core machine shared with other
jobs, 2 ranks share the same 2 cores: the number shows the overhead of DDP/gloo more than a speed-up.)

``--from-data``: each size is first prepared as a synthetic data set (about 7 interactions per user, no
reviews), and every rank starts as the stage does (``load_rank_data``: per-user example counts read one row
group at a time, its users' row groups only, its users' targets tokenized), trains, and writes its part of
the bank (``write_rank_bank``); peak RSS then covers start-up and the bank step, and the Redis part publishes
the largest size's multi-part bank (its user count replaces ``--redis-users``). ``truth_hints_mb``: the
rank's rows of the truth and hints tables, held but not counted in ``shard_mb`` ("beyond the shard" includes
them).

Redis part: a bank of ``--redis-users`` users (2 profiles) published with ``publish_bank`` (pipelined HSET
chunks) into a private redis-server: load time, Redis ``used_memory``, p50/p99 latency of single-user
``RedisBank.lookup_raw`` calls (2,000 random users, one round trip each).

Ends with ``RESULT peak_rss_mb_<U>=... beyond_shard_mb_<U>=... ratio=... users_per_s_1rank=...
users_per_s_2rank=... redis_users=... redis_load_s=... redis_mem_mb=... redis_p99_ms=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> None:
    import torch

    from userip.codebook.objective import InteractionSampler, JointObjective
    from userip.codebook.quantizer import MultiProfileQuantizer
    from userip.codebook.surrogate import SurrogateRecommender
    from userip.profile.distributed import ShardObjective, ShardTrainer, shard_soft_token_table
    from userip.profile.lm import load_causal_lm, load_tokenizer
    from userip.profile.model import ProfileModel, SoftTokenConfig, SoftTokenInit
    from userip.profile.trainer import ProfileTrainConfig
    from userip.prompts import ExampleSet, PromptBuilder, PromptConfig
    from userip.utils.distributed import init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    U, W, r = args.users, ctx.world_size, ctx.rank
    lo, hi = r * U // W, (r + 1) * U // W
    n = hi - lo
    lm = load_causal_lm(args.lm, "fp32", "cpu")
    builder = PromptBuilder(load_tokenizer(args.lm), PromptConfig())
    if args.data:
        data_worker(args, ctx, lm, builder)
        return
    vocab = lm.get_input_embeddings().weight.shape[0]
    rng = np.random.default_rng([7, r, U])
    lengths = rng.integers(24, 41, size=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    targets = rng.integers(10, vocab, size=int(offsets[-1])).astype(np.int32)
    examples = ExampleSet(builder, np.arange(n, dtype=np.int64), offsets, targets, np.zeros(0, np.int64))
    emb = lm.get_input_embeddings().weight
    table = shard_soft_token_table(lo, hi, emb, builder, SoftTokenConfig(init=SoftTokenInit.PHRASE), {}, 0)
    model = ProfileModel(lm, table, builder.config)
    per_user, items = 8, 10_000
    sampler = InteractionSampler(
        np.repeat(np.arange(lo, hi), per_user), rng.integers(0, items, n * per_user),
        rng.integers(0, 2, n * per_user), hi,
    )  # fmt: skip
    D = emb.shape[1]
    objective = JointObjective(
        MultiProfileQuantizer(["hobby", "background"], [4, 3], D, kmeans_init_samples=64),
        SurrogateRecommender(2, D, items),
        sampler,
    )
    aux = ShardObjective(objective, lo, ctx)
    batches = max(1, U // args.batch_size)
    cfg = ProfileTrainConfig(lr=0.02, batch_size=args.batch_size, max_steps=args.steps + 2, progress=False,
                      checkpoint_every=0, log_every=10**9)  # fmt: skip
    trainer = ShardTrainer(model, examples, cfg, ctx, np.array([0, U]), batches, aux=aux)
    trainer.train(stop_after_steps=2)  # warm-up
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    shard_bytes = (
        table.weight.numel() * 4 * 3  # table + RowAdam exp_avg + exp_avg_sq
        + n * 8  # RowAdam row steps
        + offsets.nbytes
        + targets.nbytes
        + examples.user_ids.nbytes
        + sampler.item_ids.nbytes
        + sampler.labels.nbytes
        + sampler.indptr.nbytes
    )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record = {
        "rank": r, "world": W, "users": U, "steps": args.steps, "seconds": seconds,
        "users_per_s": args.steps * args.batch_size / seconds, "peak_rss_mb": peak_mb,
        "shard_mb": shard_bytes / 2**20, "beyond_shard_mb": peak_mb - shard_bytes / 2**20,
    }  # fmt: skip
    Path(args.out).with_suffix(f".rank{r}.json").write_text(json.dumps(record))


def data_worker(args: argparse.Namespace, ctx, lm, builder) -> None:  # noqa: ANN001 - worker internals
    """The stage's own path from a prepared data set: bounds from the per-user example counts, this rank's
    row groups only, its users' tokenized targets (``load_rank_data``), the objective's sampler from its
    rows, a few training steps, then its part of the bank (``write_rank_bank``); peak RSS covers it all."""

    from userip.codebook.config import QuantizationConfig
    from userip.profile.bank import build_aux
    from userip.profile.distributed import (
        ShardObjective,
        ShardTrainer,
        load_rank_data,
        local_examples,
        shard_soft_token_table,
        write_rank_bank,
    )  # fmt: skip
    from userip.profile.model import ProfileModel, SoftTokenConfig, SoftTokenInit
    from userip.profile.stage import ProfileStageConfig
    from userip.profile.trainer import ProfileTrainConfig

    config = ProfileStageConfig(quantization=QuantizationConfig(kmeans_init_samples=64))
    t0 = time.perf_counter()
    data = load_rank_data(Path(args.data), config, builder, ctx)
    startup_s = time.perf_counter() - t0
    startup_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lo, hi = data.shard.user_range
    shard = local_examples(data.examples, lo, hi)
    emb = lm.get_input_embeddings().weight
    table = shard_soft_token_table(lo, hi, emb, builder, SoftTokenConfig(init=SoftTokenInit.PHRASE), {}, 0)
    model = ProfileModel(lm, table, builder.config)
    objective = build_aux(data.shard, config.prompt.profiles, emb.shape[1], config.quantization)
    aux = ShardObjective(objective, lo, ctx)
    batches = max(1, data.total_examples // args.batch_size)
    cfg = ProfileTrainConfig(lr=0.02, batch_size=args.batch_size, max_steps=args.steps + 2, progress=False,
                      checkpoint_every=0, log_every=10**9)  # fmt: skip
    trainer = ShardTrainer(model, shard, cfg, ctx, data.bounds, batches, aux=aux)
    trainer.train(stop_after_steps=2)  # warm-up
    t1 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t1
    before_bank_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t2 = time.perf_counter()
    write_rank_bank(
        Path(args.out).with_suffix(".bank"), data.shard, aux.objective,
        lambda rows: model.profile_embeds(rows).float().cpu(), shard.user_ids, ctx,
    )  # fmt: skip
    bank_s = time.perf_counter() - t2
    sampler = aux.objective.sampler if hasattr(aux.objective, "sampler") else None
    shard_bytes = (
        table.weight.numel() * 4 * 3  # table + RowAdam exp_avg + exp_avg_sq
        + (hi - lo) * 8  # RowAdam row steps
        + shard.offsets.nbytes + shard.target_ids.nbytes + shard.user_ids.nbytes
        + int(data.shard.interactions.memory_usage(deep=True).sum())
        + int(data.shard.users.memory_usage(deep=True).sum())
        + (0 if sampler is None else sampler.item_ids.nbytes + sampler.labels.nbytes)
    )  # fmt: skip
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the rank's rows of the other per-user tables (held, not counted in shard_mb above)
    tables = [t for t in (data.shard.truth, data.shard.hints) if t is not None]
    tables_mb = sum(int(t.memory_usage(deep=True).sum()) for t in tables) / 2**20
    record = {
        "truth_hints_mb": tables_mb,
        "rank": ctx.rank, "world": ctx.world_size, "users": args.users, "steps": args.steps,
        "seconds": seconds, "users_per_s": args.steps * args.batch_size / seconds, "peak_rss_mb": peak_mb,
        "shard_mb": shard_bytes / 2**20, "beyond_shard_mb": peak_mb - shard_bytes / 2**20,
        "startup_s": startup_s, "bank_s": bank_s, "peak_after_startup_mb": startup_peak_mb,
        "peak_before_bank_mb": before_bank_mb, "row_groups_read": data.shard.row_groups_read,
    }  # fmt: skip
    Path(args.out).with_suffix(f".rank{ctx.rank}.json").write_text(json.dumps(record))


def prepare_data(users: int, tmp: Path) -> Path:
    """A synthetic data set of ``users`` users (about 7 interactions each, no reviews), prepared once."""
    from userip.data.prepare import prepare_to_run_dir

    run = tmp / f"data{users}"
    opts = {"num_users": users, "num_items": 2000, "mean_interactions": 6.0, "min_interactions": 4,
            "with_reviews": False}  # fmt: skip
    t0 = time.perf_counter()
    prepare_to_run_dir(run, "synthetic", opts)
    print(f"prepared {users} users in {time.perf_counter() - t0:.1f} s", flush=True)
    return run / "data"


def run_worker(args: argparse.Namespace) -> None:
    from userip.utils.distributed import shutdown

    try:
        worker(args)  # returns first: DDP's reducer must be freed before its process group is destroyed
    finally:
        shutdown()


# ------------------------------------------------------------------------------------------------ parent
def build_lm(folder: Path, hidden_size: int = 64) -> str:
    from userip.data.prepare import prepare_to_run_dir
    from userip.data.schema import Dataset
    from userip.lm.offline import OfflineLMConfig
    from userip.lm.resolve import resolve_lm
    from userip.prompts import PromptConfig

    prepare_to_run_dir(folder, "synthetic", {"num_users": 300, "num_items": 36}, None)
    dataset = Dataset.load(folder / "data")
    config = OfflineLMConfig(hidden_size=hidden_size, max_steps=5)
    return resolve_lm("offline", dataset, folder, prompt_config=PromptConfig(), config=config, progress=False)


def run_profile(lm: str, users: int, world: int, args: argparse.Namespace, tmp: Path) -> list[dict]:
    out = tmp / f"u{users}_w{world}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           __file__, "--worker", "--lm", lm, "--users", str(users), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--out", str(out)]  # fmt: skip
    if args.from_data:
        cmd += ["--data", str(prepare_data(users, tmp))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.worker_timeout)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({users} users, {world} ranks):\n{proc.stderr[-3000:]}")
    records = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(world)]
    for rec in records:
        print(json.dumps(rec), flush=True)
    return records


def run_redis(num_users: int, tmp: Path, bank_dir: Path | None = None) -> dict[str, float]:
    """Publish a bank to a private Redis and time single-user lookups: the multi-part bank the ranks wrote
    (``bank_dir``, with --from-data) or a synthetic one of ``num_users`` users."""
    import redis

    from userip.serving.redis_bank import RedisBank, publish_bank

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        base_mem = client.info("memory")["used_memory"]
        if bank_dir is not None:
            from userip.feature_bank import FeatureBank

            bank = FeatureBank.load(bank_dir)  # every part, checked
            num_users, codes, raw = bank.num_rows, bank.codes, bank.raw_user_ids
        else:
            codes = np.random.default_rng(0).integers(0, 3, size=(num_users, 2)).astype(np.int64)
            raw = [f"u{i}" for i in range(num_users)]

            class Bank:  # the read interface publish_bank uses (a FeatureBank of this size is built so)
                profile_names, codebook_sizes = ["hobby", "background"], [4, 3]
                dataset_hash, version, codebook_hash = "bench", "v1", None
                raw_user_ids = raw

                def lookup(self, ids: np.ndarray) -> np.ndarray:
                    return codes[ids]

            bank = Bank()
        t0 = time.perf_counter()
        publish_bank(bank, client, "bench")
        load_s = time.perf_counter() - t0
        mem_mb = (client.info("memory")["used_memory"] - base_mem) / 2**20
        remote = RedisBank.open(client, "bench")
        rng = np.random.default_rng(1)
        lat = []
        for u in rng.integers(0, num_users, size=2000):
            t = time.perf_counter()
            got, known = remote.lookup_raw([raw[u]])
            lat.append(time.perf_counter() - t)
            assert known[0] == (codes[u] >= 0).all() and (got[0] == codes[u]).all()
        lat_ms = np.array(lat) * 1000
        return {"redis_users": num_users, "redis_load_s": load_s, "redis_mem_mb": mem_mb,
                "redis_p50_ms": float(np.percentile(lat_ms, 50)),
                "redis_p99_ms": float(np.percentile(lat_ms, 99))}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lm", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--users", default="100000,1000000")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--redis-users", type=int, default=10_000_000)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument(
        "--hidden",
        type=int,
        default=64,
        help="the offline LM's hidden size (the soft tokens' width: the shard's table is users x 2 x hidden "
        "x 4 B, x3 with RowAdam's moments); a smaller one fits more users in memory",
    )
    p.add_argument("--worker-timeout", type=int, default=900, help="seconds per torchrun run (one size)")
    p.add_argument(
        "--from-data",
        action="store_true",
        help="ranks start from a prepared synthetic data set (the stage's own start-up: row groups, "
        "tokenization) and write their bank parts, instead of building random shards",
    )
    args = p.parse_args()
    if args.worker:
        args.users = int(args.users)
        run_worker(args)
        return
    sizes = [int(s) for s in args.users.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp_name:
        tmp = Path(tmp_name)
        lm = build_lm(tmp / "seed", args.hidden)
        result: dict[str, float] = {}
        two = {u: run_profile(lm, u, 2, args, tmp) for u in sizes}
        one = run_profile(lm, sizes[0], 1, args, tmp) if not args.from_data else None
        for u in sizes:
            tag = f"{u // 1000}k" if u < 10**6 else f"{u // 10**6}m"
            result[f"peak_rss_mb_{tag}"] = max(r["peak_rss_mb"] for r in two[u])
            result[f"shard_mb_{tag}"] = max(r["shard_mb"] for r in two[u])
            result[f"beyond_shard_mb_{tag}"] = max(r["beyond_shard_mb"] for r in two[u])
        beyond = [max(r["beyond_shard_mb"] for r in two[u]) for u in sizes]
        result["ratio"] = max(beyond) / min(beyond)
        if one is not None:
            result["users_per_s_1rank"] = one[0]["users_per_s"]
        else:
            for u in sizes:
                tag = f"{u // 1000}k" if u < 10**6 else f"{u // 10**6}m"
                result[f"startup_s_{tag}"] = max(r["startup_s"] for r in two[u])
                result[f"bank_s_{tag}"] = max(r["bank_s"] for r in two[u])
                result[f"truth_hints_mb_{tag}"] = max(r["truth_hints_mb"] for r in two[u])
        result["users_per_s_2rank"] = two[sizes[0]][0]["users_per_s"]
        result["s_per_user_2rank"] = 1 / result["users_per_s_2rank"]
        if args.redis_users > 0:
            bank_dir = None
            if args.from_data:  # the largest size's bank, written by both ranks as parts
                bank_dir = (tmp / f"u{sizes[-1]}_w2").with_suffix(".bank")
            result.update(run_redis(args.redis_users, tmp, bank_dir))
    fields = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()]
    start = "from_prepared_data_with_bank_parts" if args.from_data else "random_shards"
    fields.append(
        f"measured=2ranks_gloo_cpu_{args.steps}steps_batch{args.batch_size}_hidden{args.hidden}"
        f"_peak_rss_per_rank_{start}"
    )
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
