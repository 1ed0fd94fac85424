"""A stream peer in a process of its own, for tests/e2e/test_streams.py to kill.

Listens like a shard (``StreamListener``) on a Unix socket, writes its address as JSON to
``--address-file``, and for every item it handles appends ``{epoch} {kind} {n}`` to ``--log``
(flushed per batch, so what was handled before a SIGKILL is on disk). Requests ``("q", id, n)``
are answered with ``n``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid

from sentientedge import wire
from sentientedge.streams import StreamListener


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--unix", required=True)
    parser.add_argument("--address-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    epoch = uuid.uuid4().hex[:8]
    log = open(args.log, "a", buffering=1)  # noqa: SIM115 - open for the life of the process

    def on_items(peer: str, items: list[tuple]) -> None:
        log.write("".join(f"{epoch} {item[0]} {item[-1]}\n" for item in items))
        log.flush()
        for item in items:
            if item[0] == "q":
                listener.end(peer).push((wire.REPLY, item[1], item[2]), control=True)

    listener = StreamListener(
        "shard", epoch, wire.link_key(args.secret), on_items, keep=lambda item: item[0] != "p"
    )
    address = await listener.start(args.unix, None)
    tmp = args.address_file + ".tmp"
    with open(tmp, "w") as out:
        json.dump(address, out)
    os.replace(tmp, args.address_file)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
