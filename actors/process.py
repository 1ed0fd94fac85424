"""An actor's process: what it costs (CPU time, resident memory), its scheduling priority and
its Prometheus endpoint."""

from __future__ import annotations

import asyncio
import gc
import os
import resource
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


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


def serve_at_normal_priority() -> int:
    """Run the calling thread (an async actor's event loop) at nice 0 if allowed; returns the
    niceness it runs at. Ray starts workers at nice 15 unless the cluster says otherwise
    (``worker_niceness``); a server waiting behind batch work adds that wait to every message."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            # On Linux this is per thread: the event loop's thread, the one that serves.
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:  # lowering niceness needs privilege (CAP_SYS_NICE or RLIMIT_NICE)
        pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def calm_garbage_collector() -> None:
    """Fewer, cheaper collections for a process that serves messages.

    Every message allocates a handful of short-lived objects and almost none are cyclic, yet the
    default threshold (700 net allocations) runs a collection every hundred or so messages, and
    each full one walks every object the process holds (tens of thousands of connections and
    sessions): milliseconds in the middle of a batch. What exists after start-up (Ray, the
    modules) is frozen out of the collector's view; the young generation is collected ten times
    less often.
    """
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


async def serve_metrics(registry: Any, host: str) -> tuple[asyncio.AbstractServer, str]:
    """This process's Prometheus endpoint (``GET /metrics``) on a free port of ``host``, served
    by its event loop (the counters it reads are that loop's: no thread reads them half-made).
    Returns the server and its ``host:port``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body, status = generate_latest(registry), b"200 OK"
            else:
                body, status = b"not found\n", b"404 Not Found"
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: "
                + CONTENT_TYPE_LATEST.encode()
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, host, 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"{host}:{port}"
