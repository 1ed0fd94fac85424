"""What an actor's process costs: CPU time and resident memory, for status and benchmarks."""

from __future__ import annotations

import os
import resource


def process_stats() -> dict[str, float | int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = usage.ru_maxrss * 1024
    return {
        "pid": os.getpid(),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "rss_bytes": rss,
    }
