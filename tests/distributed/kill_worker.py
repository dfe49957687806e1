"""A torchrun worker that runs ``userip profile --distributed`` and SIGKILLs itself on one rank after a given
step (a real kill: no cleanup, no checkpoint of that step). Used by test_profile_distributed.py.

    torchrun --nproc_per_node 2 tests/distributed/kill_worker.py KILL_RANK KILL_AFTER_STEP -- profile args...
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from userip.cli import main
from userip.profile.distributed import ShardTrainer


def _install_kill(rank: int, after_step: int) -> None:
    original = ShardTrainer._step

    def step(self, group):  # noqa: ANN001, ANN202 - same signature as ShardTrainer._step
        if self.ctx.rank == rank and self.state.step >= after_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, group)

    ShardTrainer._step = step  # type: ignore[method-assign]


if __name__ == "__main__":
    torch.set_num_threads(1)
    kill_rank, kill_after = int(sys.argv[1]), int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    if kill_rank >= 0:
        _install_kill(kill_rank, kill_after)
    sys.exit(main(args))
