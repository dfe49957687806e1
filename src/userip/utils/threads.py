"""How many intra-op threads a CPU stage uses: from the size of its work and the CPUs this process may use.

Why a rule at all: torch's CPU kernels run on an OpenMP pool whose threads, by default, spin while they wait
for each other. With more runnable threads than cores (two experiments on a 2-core machine, or a 16-thread
pool on a busy host) a spinning thread burns the core its partner needs, and every small op pays a scheduler
slice: a DCN trainer measured 2.6-3.8k rows/s beside two other jobs with torch's default (one thread per core)
and 62-68k rows/s with one thread. Two things prevent that collapse:

* **Threads only where the work pays for them.** A CTR step is hundreds of small ops (a DCN step on 4,096
  rows is about 10 MFLOP); splitting each across threads costs more in synchronisation than it saves, so
  such stages run on one thread. An LM step (a 135M-parameter model on 4k tokens is about 3 TFLOP) uses
  every CPU it may use. ``threads_for_work`` gives one thread per ``FLOPS_PER_THREAD`` of work in a step.
* **Waiting threads sleep.** ``prefer_passive_wait`` sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the user set
  it) before torch loads its OpenMP runtime, so a pool that does share cores with another process yields
  them instead of spinning.

"The CPUs this process may use" is its affinity mask (``os.sched_getaffinity``: taskset, cpusets, Slurm,
Kubernetes CPU pinning) bounded by a cgroup v2 CPU quota (``cpu.max``, how Docker's ``--cpus`` works), not
``os.cpu_count()``, which counts the host's cores.

An explicit count always wins: a stage's own setting (``trainer.num_threads``, ``userip train --threads``),
else ``userip --threads N`` / the ``USERIP_NUM_THREADS`` environment variable, else the rule.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from userip.utils.config import ConfigError
from userip.utils.logging import get_logger

if TYPE_CHECKING:  # torch is imported lazily: the CLI imports this module before torch (prefer_passive_wait)
    from torch import nn

log = get_logger(__name__)

THREADS_ENV = "USERIP_NUM_THREADS"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
# One thread per this many floating-point operations in one step (forward and backward). At the ~20-100
# GFLOP/s a core sustains, that is 10-50 ms of work per thread per step, against a few microseconds of
# synchronisation per op: past it a second thread pays; below it (CTR models) it does not.
FLOPS_PER_THREAD = 1e9
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max_file: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity mask, bounded by a cgroup v2 quota when one is set, and
    shared with the other processes torchrun started on this node (``LOCAL_WORLD_SIZE``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max_file.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 quota readable: the affinity mask is all we know
        pass
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    if local_ranks.isdigit() and int(local_ranks) > 1:
        cpus //= int(local_ranks)
    return max(1, cpus)


def threads_for_work(flops_per_step: float, cpus: int | None = None) -> int:
    """One thread per ``FLOPS_PER_THREAD`` of work in a step, at least 1 and at most the usable CPUs."""
    cpus = usable_cpus() if cpus is None else cpus
    return int(min(cpus, max(1, flops_per_step // FLOPS_PER_THREAD)))


def requested_threads() -> int | None:
    """The process-wide override (``userip --threads N`` or ``USERIP_NUM_THREADS``), or None."""
    value = os.environ.get(THREADS_ENV)
    if value is None or value == "":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{THREADS_ENV}={value!r}: expected a positive whole number of threads")
    return int(value)


def choose_threads(requested: int | None, flops_per_step: float) -> tuple[int, str]:
    """The thread count of a stage and why: ``requested``, else the override, else the rule."""
    chosen = requested or requested_threads()
    if chosen is not None:
        return chosen, "requested"
    why = f"{flops_per_step / 1e9:.3g} GFLOP per step, {usable_cpus()} usable CPUs"
    return threads_for_work(flops_per_step), why


def set_intra_op_threads(requested: int | None, flops_per_step: float, stage: str) -> int:
    """Set torch's intra-op threads for ``stage`` (``choose_threads``); logged."""
    import torch

    chosen, why = choose_threads(requested, flops_per_step)
    if torch.get_num_threads() != chosen:
        torch.set_num_threads(chosen)
    log.info("%s: %d intra-op thread(s) (%s)", stage, chosen, why)
    return chosen


def prefer_passive_wait() -> None:
    """Let idle OpenMP threads sleep rather than spin (see the module doc); a user's setting is kept.

    Takes effect only before torch (and its OpenMP runtime) is first imported in this process: the CLI calls
    it first thing, and subprocesses it starts inherit it.
    """
    os.environ.setdefault(WAIT_POLICY_ENV, "PASSIVE")


def dense_flops_per_row(model: nn.Module) -> float:
    """Multiply-adds of a CTR model's dense (non-embedding) layers per row, forward and backward (x3).

    Embedding lookups move memory rather than compute and do not split well across threads, so they are left
    out; every other parameter takes part in about one multiply-add per row.
    """
    from torch import nn

    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in embedding_params)
    return 3 * 2 * float(dense)
