"""A torchrun worker that runs a ``userip`` command and stops one rank after a given point: it SIGKILLs
itself (a real kill: no cleanup, no checkpoint of that step), or with ``--hold MARKER`` writes its pid to
MARKER and waits there, so that the test can kill its whole node (launcher and worker) at a known point.

The point: ``userip profile`` -- before profile step N (``ShardTrainer._step`` with N steps done);
``userip train`` -- before CTR epoch N (``DistributedTrainer.train_epoch``, epochs counted from 1).

    torchrun --nproc_per_node 2 tests/distributed/kill_worker.py RANK N [--hold MARKER] -- profile args...

Used by test_profile_distributed.py and test_two_nodes.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

from userip.cli import main
from userip.ctr.distributed import DistributedTrainer
from userip.profile.distributed import ShardTrainer
from userip.utils.io import atomic_write_text

HOLD_S = 600.0  # far longer than any test waits: the test kills the node first


def _stop(marker: Path | None) -> None:
    if marker is None:
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_write_text(marker, str(os.getpid()))
    time.sleep(HOLD_S)
    os.kill(os.getpid(), signal.SIGKILL)  # never go on: the point of the hold is a known last step


def _install_profile_stop(rank: int, before_step: int, marker: Path | None) -> None:
    original = ShardTrainer._step

    def step(self, group):  # noqa: ANN001, ANN202 - same signature as ShardTrainer._step
        if self.ctx.rank == rank and self.state.step >= before_step:
            _stop(marker)
        return original(self, group)

    ShardTrainer._step = step  # type: ignore[method-assign]


def _install_ctr_stop(rank: int, before_epoch: int, marker: Path | None) -> None:
    original = DistributedTrainer.train_epoch

    def train_epoch(self, train, generator, epoch=1):  # noqa: ANN001, ANN202 - as Trainer.train_epoch
        if self.ctx.rank == rank and epoch >= before_epoch:
            _stop(marker)
        return original(self, train, generator, epoch)

    DistributedTrainer.train_epoch = train_epoch  # type: ignore[method-assign]


if __name__ == "__main__":
    torch.set_num_threads(1)
    split = sys.argv.index("--")
    options, args = sys.argv[1:split], sys.argv[split + 1 :]
    stop_rank, stop_at = int(options[0]), int(options[1])
    hold = Path(options[3]) if options[2:3] == ["--hold"] else None
    if stop_rank >= 0:
        install = _install_ctr_stop if args[0] == "train" else _install_profile_stop
        install(stop_rank, stop_at, hold)
    sys.exit(main(args))
