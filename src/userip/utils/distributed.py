"""torch.distributed process-group setup and the few collectives the distributed stages share.

Launch with ``torchrun --nproc_per_node N -m userip.cli <command> ...``: torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and ``init_distributed`` reads them
(``init_method="env://"``). Backend: NCCL when the stage runs on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


class DistributedError(ValueError):
    """A distributed run cannot start or continue (no launcher environment, too few users for the ranks,
    resume with another number of ranks); the message says which."""


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device  # where this rank's LM runs (cuda:LOCAL_RANK under NCCL)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors handed to collectives must live (NCCL: the rank's GPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def launcher_world_size() -> int:
    """The number of ranks the launcher started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def distributed_requested(flag: bool) -> bool:
    """A CLI stage runs distributed when ``--distributed`` is given or torchrun started several ranks."""
    return flag or launcher_world_size() > 1


def rank_log_file(log_dir: Path, stage: str, distributed: bool) -> Path:
    """``LOG_DIR/<stage>.log`` for rank 0 (and one process), ``<stage>.rank<r>.log`` for the other ranks."""
    rank = int(os.environ.get("RANK", "0")) if distributed else 0
    return log_dir / (f"{stage}.log" if rank == 0 else f"{stage}.rank{rank}.log")


def init_distributed(device: str = "cpu", timeout_s: float = 1800.0) -> DistContext:
    """Join (or reuse) the default process group from the launcher's environment.

    ``device``: the stage's LM device; ``cuda`` means NCCL with one GPU per rank (``cuda:LOCAL_RANK``).
    """
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    want_cuda = torch.device(device).type == "cuda"
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DistributedError(
                f"--distributed needs the launcher's environment (missing {missing}); start with "
                "`torchrun --nproc_per_node N -m userip.cli ...`"
            )
        if want_cuda and not torch.cuda.is_available():
            raise DistributedError(f"lm.device {device!r} but CUDA is not available")
        backend = "nccl" if want_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        rank_device = torch.device("cuda", local_rank)
    else:
        rank_device = torch.device(device)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, str(backend), rank_device)


def shutdown() -> None:
    """Destroy the default group. DDP reducers still alive then deadlock at exit when they are freed after
    their gloo group (seen in torch 2.13): collect unreachable ones first; callers drop theirs before."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _padded_rows(x: torch.Tensor, ctx: DistContext) -> tuple[torch.Tensor, list[int]]:
    """``x`` padded to the largest rank's row count, and every rank's count: the collectives below need
    equal shapes."""
    dev = ctx.comm_device
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(ctx.world_size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.int64, device=dev))
    sizes = [int(c) for c in counts]
    padded = x.new_zeros((max(sizes), *x.shape[1:]), device=dev)
    padded[: x.shape[0]] = x.to(dev)
    return padded, sizes


def all_gather_rows(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every rank's ``x`` (N_r, ...) along dim 0, in rank order, on every rank."""
    x = x.contiguous()
    if ctx.world_size == 1:
        return x
    padded, sizes = _padded_rows(x, ctx)
    out = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, sizes)]).to(x.device)


def gather_rows_to_main(x: torch.Tensor, ctx: DistContext) -> torch.Tensor | None:
    """Every rank's ``x`` (N_r, ...) concatenated in rank order on rank 0 (None elsewhere)."""
    x = x.contiguous()
    if ctx.world_size == 1:
        return x
    padded, sizes = _padded_rows(x, ctx)
    out = [torch.empty_like(padded) for _ in range(ctx.world_size)] if ctx.is_main else None
    dist.gather(padded, out, dst=0)
    if out is None:
        return None
    return torch.cat([o[:n] for o, n in zip(out, sizes)]).to(x.device)


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of a few floats over the ranks (float64)."""
    if ctx.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def rank_reduce(ctx: DistContext) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """``reduce(t, op)``: the element-wise sum (op "sum") or maximum ("max") of ``t`` over the ranks, on
    every rank (an all-reduce of a copy). The ``RowReduce`` with which
    ``ProfileQuantizer.fit_balance_distances`` fits on rows split over the ranks."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
        buf = t.detach().to(ctx.comm_device, copy=True)
        dist.all_reduce(buf, op=ops[op])
        return buf.to(t.device)

    return reduce


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.local_rank])
        else:
            dist.barrier()
