"""Torch's CPU threads, and the one-line warning when the CPU is already busy.

Contract: `use_threads(n, key)` sets torch's intra-op threads to `n` (0 keeps torch's default),
prints `busy_warning`'s line on stderr when there is one, and returns the thread count in use.
`busy_warning(threads, key, load, cores)` is that line, or None: torch's threads wait for each
other at every matmul, so when another job already holds part of the CPU (1-minute load average
>= 0.5 once this process's own share, `own_load`, is taken off, and more threads than the cores
left over) one thread is often several times faster
(2 cores, another job using ~half a core: 25–30 s/step at 2 threads against 1.8–2.0 s/step at 1).
"""

from __future__ import annotations

import os
import sys

BUSY_LOAD = 0.5


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def own_load() -> float:
    """About how much of the load average is this process's own (training before `compare`): its
    CPU seconds over its age, at least a minute (Linux; 0 where /proc is missing)."""
    import resource

    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) / max(age, 60.0)


def busy_warning(threads: int, key: str, load: float | None = None, n_cores: int | None = None) -> str | None:
    if load is None:
        try:
            load = max(0.0, os.getloadavg()[0] - own_load())
        except (AttributeError, OSError):  # Windows has no load average
            return None
    n_cores = n_cores or cores()
    if threads <= 1 or load < BUSY_LOAD or threads <= n_cores - load:
        return None
    return (
        f"tunesmith: warning: the CPU is already busy (load average {load:.1f} on {n_cores} cores) and torch "
        f"uses {threads} threads, which then wait for each other; {key}=1 is often several times faster"
    )


def use_threads(n: int, key: str, warn: bool = True) -> int:
    import torch

    if n:
        torch.set_num_threads(n)
    threads = torch.get_num_threads()
    if warn:
        warn_if_busy(threads, key)
    return threads


def warn_if_busy(threads: int, key: str) -> None:
    """The busy-CPU line, printed once the inputs and the model are read (their errors stay one line)."""
    line = busy_warning(threads, key)
    if line:
        print(line, file=sys.stderr, flush=True)
