"""Two torchrun "nodes" on this machine, launched as users launch a multi-node job: one torchrun launcher per
node, one worker each, c10d rendezvous on a free local port (node ranks are assigned by the rendezvous).

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint localhost:PORT \
        --rdzv-id ID --max-restarts 0 -m userip.cli ...      # the same command on each node

Each launcher starts in its own session (process group); torchrun starts each worker in a session of its
own too, so a node is killed by SIGKILL to both groups. ``TwoNodes`` kills whatever is left at exit, and every
wait has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

HERE = Path(__file__).parent
SRC = HERE.parents[1] / "src"
NODES = 2


def free_port() -> int:
    """A port nobody listens on now (bound to 0 and released; the rendezvous binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def torchrun_command(port: int, program: list[str]) -> list[str]:
    """One node's launcher command. ``--max-restarts 0``: a node whose worker fails (its peer was lost) ends
    instead of re-joining the rendezvous and waiting for the lost node, which is what a relaunch of the job
    is for. ``program``: ``-m userip.cli ...`` or a script and its arguments."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", f"userip-{port}",
        "--max-restarts", "0", *program,
    ]  # fmt: skip


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the command's parentheses
                found.append(int(entry.name))
    return found


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class TwoNodes:
    """Both nodes of one job launch; ``wait`` for them, or ``kill_node`` one mid-run."""

    def __init__(self, program: list[str], env: dict[str, str], logs: list[IO[str]]) -> None:
        port = free_port()
        self.logs = logs
        self.procs = [
            subprocess.Popen(
                torchrun_command(port, program),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for log in self.logs
        ]

    def wait(self, timeout: float) -> list[int]:
        """Every launcher's exit code (torchrun's: 0, or 1 for any failed worker)."""
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.procs]

    def output(self) -> str:
        """Both launchers' output (their workers' stdout and stderr included), node by node."""
        text = []
        for i, log in enumerate(self.logs):
            log.seek(0)
            text.append(f"----- node {i}\n{log.read()}")
        return "\n".join(text)

    def node_of(self, worker_pid: int) -> int:
        """Which node's launcher started ``worker_pid``."""
        for i, proc in enumerate(self.procs):
            if worker_pid in _children(proc.pid):
                return i
        raise AssertionError(f"worker {worker_pid} is no launcher's child\n{self.output()}")

    def kill_node(self, node: int) -> None:
        """SIGKILL node ``node``: its launcher's process group and each worker's (a worker has its own)."""
        proc = self.procs[node]
        workers = _children(proc.pid)
        _kill_group(proc.pid)
        for pid in workers:
            _kill_group(pid)
        proc.wait(timeout=30)

    def close(self) -> None:
        for node in range(NODES):
            if self.procs[node].poll() is None or _children(self.procs[node].pid):
                self.kill_node(node)


@contextlib.contextmanager
def two_nodes(program: list[str]) -> Iterator[TwoNodes]:
    """Launch both nodes of ``program`` (gloo, one thread each); kill everything left when the block ends."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    with tempfile.TemporaryFile("w+") as log_0, tempfile.TemporaryFile("w+") as log_1:
        nodes = TwoNodes(program, env, [log_0, log_1])
        try:
            yield nodes
        finally:
            nodes.close()


def wait_for_file(path: Path, timeout: float, nodes: TwoNodes) -> str:
    """``path``'s text once it exists; fails (with both nodes' output) after ``timeout`` s or when a node
    has ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        ended = [p.poll() for p in nodes.procs]
        if any(code is not None for code in ended) or time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared (launchers: {ended})\n{nodes.output()[-6000:]}")
        time.sleep(0.1)
    return path.read_text()
