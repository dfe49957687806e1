"""Benchmark: a DDP CTR step with dense vs sparse-gradient embedding tables (2 gloo ranks, CPU), same run.

Why: under ``DistributedDataParallel`` a dense ``nn.Embedding`` gradient is as large as its table, so every
step all-reduces (and Adam steps) every row: 64 MB per step at 1M users x 16 dims. With
``CTRTrainerConfig.sparse_embeddings`` the tables have sparse gradients (only the rows in the batch), DDP
all-reduces them as sparse tensors and ``SparseAdam`` steps only those rows. TorchRec's sharded tables would
be the next step; they cannot run with this project's torch (docs/distributed.md says why).

Each rank builds DCN (embedding 16, 2 cross layers, MLP (64, 32)) over user (``--users``), item
(``--items``) and two small context fields, wraps it in the project's ``DistributedTrainer`` and times
``--steps`` training steps after 2 warm-up steps on random rows, first dense then sparse.

    python bench/bench_sparse_ddp.py [--users 1000000] [--items 100000] [--batch-size 4096] [--steps 10]

Ends with ``RESULT users=... dense_ms_per_step=... sparse_ms_per_step=... speedup=...
dense_grad_mb_per_step=... sparse_grad_mb_per_step=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def rank_main(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from userip.ctr.data import SplitTensors
    from userip.ctr.distributed import DistributedTrainer
    from userip.ctr.features import FeatureMap, Field
    from userip.ctr.models import build_model
    from userip.ctr.trainer import CTRTrainerConfig
    from userip.utils.distributed import DistContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    sizes = {"user_id": args.users + 1, "item_id": args.items + 1, "ctx_a": 9, "ctx_b": 13}
    feature_map = FeatureMap(tuple(Field(k, v) for k, v in sizes.items()))
    gen = torch.Generator().manual_seed(rank)
    local = args.batch_size // world
    num_rows = local * (args.steps + 2)
    x = torch.stack([torch.randint(1, n, (num_rows,), generator=gen) for n in sizes.values()], 1)
    y = (torch.rand(num_rows, generator=gen) < 0.3).float()
    result = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        model = build_model("dcn", feature_map, embedding_dim=16, num_cross_layers=2, hidden_units=(64, 32))
        config = CTRTrainerConfig(batch_size=args.batch_size, sparse_embeddings=sparse, num_threads=1)
        trainer = DistributedTrainer(model, config, ctx=ctx)
        data = SplitTensors(x, y)
        times = []
        for step in range(args.steps + 2):
            rows = slice(step * local, (step + 1) * local)
            dist.barrier()
            start = time.perf_counter()
            logits = trainer.train_module(data.x_ids[rows])
            loss = F.binary_cross_entropy_with_logits(logits, data.labels[rows])
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
            times.append(time.perf_counter() - start)
        grads = [p.grad for p in model.embedding_parameters()]
        grad_bytes = sum(
            (g._values().numel() + g._indices().numel() * 2) * 4 if g.is_sparse else g.numel() * 4
            for g in grads
        )
        result["sparse" if sparse else "dense"] = {
            "ms_per_step": 1000 * sum(times[2:]) / args.steps,
            "grad_mb": grad_bytes / 2**20,
        }
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=4096, help="global batch (split over the 2 ranks)")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench_sparse_ddp_") as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(rank_main, args=(2, str(Path(tmp) / "store"), args, out), nprocs=2, join=True)
        result = json.loads(Path(out).read_text())
    dense, sparse = result["dense"], result["sparse"]
    print(
        f"{args.users:,} users, {args.items:,} items, embedding 16, global batch {args.batch_size}, "
        "2 gloo ranks:"
        f" dense {dense['ms_per_step']:.1f} ms/step, sparse {sparse['ms_per_step']:.1f} ms/step"
    )
    print(
        f"RESULT users={args.users} dense_ms_per_step={dense['ms_per_step']:.1f} "
        f"sparse_ms_per_step={sparse['ms_per_step']:.1f} "
        f"speedup={dense['ms_per_step'] / sparse['ms_per_step']:.2f} "
        f"dense_grad_mb_per_step={dense['grad_mb']:.1f} sparse_grad_mb_per_step={sparse['grad_mb']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
