#!/usr/bin/env python3
"""Peak RSS of a proxy holding N idle keep-alive client connections.

    python3 benches/load/idle_connections.py PORT PID [N] [KEY]

Opens N connections to 127.0.0.1:PORT, sends one GET / on each (with `X-API-Key: KEY` when
given) and reads its answer, then leaves every connection open and idle, and prints the
VmRSS / VmHWM of process PID before and after, in MB. Standard library only; raises its own
open-file limit to what N needs.
"""
import asyncio
import resource
import sys


def rss_mb(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
    return fields


async def one(port, request, sem):
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n")[0].decode())
        return writer


async def main():
    port, pid = int(sys.argv[1]), int(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
    key = sys.argv[4] if len(sys.argv) > 4 else None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 1024)), hard))
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n"
    if key:
        request += b"X-API-Key: " + key.encode() + b"\r\n"
    request += b"\r\n"
    before = rss_mb(pid)
    sem = asyncio.Semaphore(256)
    writers = await asyncio.gather(*(one(port, request, sem) for _ in range(n)))
    await asyncio.sleep(2)
    after = rss_mb(pid)
    print(
        f"{n} idle connections: RSS {before['VmRSS']:.1f} -> {after['VmRSS']:.1f} MB, "
        f"peak {after['VmHWM']:.1f} MB, {(after['VmRSS'] - before['VmRSS']) * 1024 / n:.1f} KB each"
    )
    for w in writers:
        w.close()


asyncio.run(main())
