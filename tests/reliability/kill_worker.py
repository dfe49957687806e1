"""Runs a ``userip`` command and SIGKILLs itself just before profile training step N (a real kill: no
cleanup, no checkpoint of that step). Used by the resume tests.

    python tests/reliability/kill_worker.py KILL_BEFORE_STEP -- profile --run-dir RUN ...
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from userip.cli import main
from userip.profile.trainer import ProfileTrainer


def _install_kill(before_step: int) -> None:
    original = ProfileTrainer._step

    def step(self, group):  # noqa: ANN001, ANN202 - same signature as ProfileTrainer._step
        if self.state.step >= before_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, group)

    ProfileTrainer._step = step  # type: ignore[method-assign]


if __name__ == "__main__":
    torch.set_num_threads(1)
    kill_before = int(sys.argv[1])
    if kill_before >= 0:
        _install_kill(kill_before)
    sys.exit(main(sys.argv[sys.argv.index("--") + 1 :]))
