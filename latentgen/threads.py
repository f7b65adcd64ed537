"""How many CPU threads torch uses: what the user set, else as many as the cores other work leaves free.

torch starts one intra-op thread per core, and every operator waits for the slowest of them. On a machine
whose cores are busy with other jobs one of them is always waiting for a core, and a step stalls: the shapes
demo's codec stage ran 5-9 s per step instead of 0.1 s with two threads on a 2-core machine that had another
job running, and a test suite beside a training run slowed it 50x. So the apps measure how busy the cores
are when they start and use only the free ones, saying so in a log line; an explicit `threads=N` (or
OMP_NUM_THREADS in the environment) always wins.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("latentgen.threads")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int, int] | None:
    """(busy, total) jiffies of all CPUs and the number of CPUs, from /proc/stat."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    fields = [int(value) for value in lines[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return sum(fields) - idle, sum(fields), cpus


def busy_cores(interval: float = 0.3) -> float | None:
    """How many cores other work keeps busy now: the machine's CPU use over `interval` seconds (this process
    sleeps meanwhile), in cores; the 1-minute load average where /proc/stat cannot be read; None if neither."""
    first = _cpu_times()
    if first is None:
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return None
    time.sleep(interval)
    second = _cpu_times()
    if second is None or second[1] == first[1]:
        return None
    return (second[0] - first[0]) / (second[1] - first[1]) * first[2]


def choose_threads(setting: int | None, busy: float | None, cores: int, current: int,
                   environment: dict[str, str] | None = None) -> tuple[int, str | None]:
    """The thread count to use and, when it is not simply torch's own choice, why. A core counts as taken when
    other work uses more than half of it."""
    environment = os.environ if environment is None else environment
    if setting is not None:
        return int(setting), None
    if environment.get("OMP_NUM_THREADS"):
        return current, None  # the user's choice, which torch already follows
    if busy is None:
        return current, None
    free = max(1, cores - int(busy + 0.5))
    if free >= current:
        return current, None
    return free, (f"{busy:.1f} of {cores} cores are busy with other work: using {free} torch thread"
                  f"{'s' if free > 1 else ''} instead of {current} (two threads sharing a busy core were measured "
                  f"10-50x slower per step); threads=N overrides")


def configure_threads(setting: int | None) -> int:
    """Set torch's intra-op thread count for this process as `choose_threads` says, logging a reduction."""
    import torch

    current = torch.get_num_threads()
    measure = setting is None and current > 1 and not os.environ.get("OMP_NUM_THREADS")
    threads, reason = choose_threads(setting, busy_cores() if measure else None, usable_cores(), current)
    if reason:
        log.info(reason)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
