"""How many CPU threads torch may use: the cores this process may really run on, shared among local ranks.

Torch sizes its OpenMP pool from the machine's core count. Two things make that too many: a launcher
(`torchrun`, `accelerate launch`) starting N processes on the same cores, each with a full pool, and a
cgroup CPU quota (containers) smaller than the cores it can see. OpenMP threads wait for each other at
the end of every parallel region, so when the pool is larger than the CPU time the process actually
gets, most of a step is spent waiting for a thread that is not running (issue 12 item 6 measured
4-16x slower training on a 2-core machine with neighbours). Even with the right count, a neighbour process
on one of the cores makes OpenMP's spinning waits expensive, so idle threads are told to sleep
(OMP_WAIT_POLICY=PASSIVE). A user's or launcher's own setting always wins.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

# Any of these set means someone chose already (the user, accelerate, torchrun with --nproc > 1 ...).
USER_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# OpenMP's own knobs for how an idle thread waits; set, they are the user's choice.
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# Processes a launcher started on this machine: torchrun (and accelerate launch, which runs it); MPI.
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup quota (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), None when unlimited."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return int(quota) / int(period)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), capped by a cgroup quota rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit))) if limit else max(1, cores)


def local_world_size(env: Mapping[str, str]) -> int:
    """Processes a launcher started on this machine (1 when not launched)."""
    for var in LOCAL_SIZE_VARS:
        if env.get(var, "").strip().isdigit() and int(env[var]) > 0:
            return int(env[var])
    return 1


def default_threads(cores: int, local_size: int, env: Mapping[str, str]) -> int | None:
    """Threads per process: usable cores divided among the local processes, at least 1.

    Args:
        cores: cores this process may use (`usable_cores()`).
        local_size: processes sharing them (`local_world_size(env)`).
        env: the environment; when it sets OMP_NUM_THREADS or MKL_NUM_THREADS the answer is None
            (leave torch alone: the user or launcher chose).
    """
    if any(env.get(var, "").strip() for var in USER_VARS):
        return None
    return max(1, cores // max(1, local_size))


def default_wait_policy(env: Mapping[str, str]) -> str | None:
    """OMP_WAIT_POLICY to set: PASSIVE (idle threads sleep) unless the user set a wait knob, then None.

    OpenMP's default lets a thread that finished its share spin for a while before sleeping. When another
    process holds one of the cores, the spinning thread burns the CPU time the late thread needs, and every
    parallel region waits for a whole scheduler slice: on 2 cores with one busy neighbour a training step was
    4-8x slower than with one thread; with sleeping threads it ran at 0.6-1.7x one thread's speed (docs/benchmarks.md).
    """
    return None if any(env.get(var, "").strip() for var in WAIT_VARS) else "PASSIVE"


def apply_default_threads(env: Mapping[str, str] | None = None) -> int | None:
    """Set torch's thread count and wait policy unless the user did; the thread count set, or None.

    Call before torch is imported: OpenMP reads OMP_NUM_THREADS and OMP_WAIT_POLICY when it starts (the
    count is also applied to an already imported torch; the wait policy then cannot change).
    """
    import sys

    env = os.environ if env is None else env
    policy = default_wait_policy(env)
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy
    n = default_threads(usable_cores(), local_world_size(env), env)
    if n is None:
        return None
    os.environ["OMP_NUM_THREADS"] = str(n)  # torch not imported yet: it reads this when it starts
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n
