#!/usr/bin/python3
"""A TCP proxy for smtppool's tests and benches: counts the connections
open at once (as sockets, the way a provider counts them), and can delay
every chunk each way to simulate a link's round trip (this kernel has no
netem).

    tcpproxy.py --target 127.0.0.1:25 [--delay 0.0105] [--log events.jsonl]

It binds 127.0.0.1 on a free port and prints "PORT <n>" once it listens.
The log has one JSON line per client connection opened ({"ev": "open",
"open": <connections open now, this one included>, "t": ...}) and closed
({"ev": "close", "open": <left open>}). A connection counts as open from its
accept until the client's side has closed."""

import argparse
import asyncio
import json
import os
import signal
import time


class Proxy:
    def __init__(self, target, delay, log):
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.delay = delay
        self.log = open(log, "a", encoding="utf-8") if log else None
        self.open = 0

    def write(self, **rec):
        if self.log:
            rec["t"] = time.time()
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()

    async def pipe(self, reader, writer):
        """Copies one direction. With a delay, a delay line: every chunk is
        written `delay` seconds after it was read, reads never wait for
        writes, so chunks in flight overlap as on a real link."""
        loop = asyncio.get_running_loop()
        q = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await q.get()
                if data is None:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                q.put_nowait((loop.time() + self.delay, data))
        except (ConnectionError, OSError):
            pass
        finally:
            q.put_nowait((0, None))
            try:
                await sender
            except (ConnectionError, OSError):
                pass
            try:
                writer.close()
            except Exception:
                pass

    async def handle(self, creader, cwriter):
        self.open += 1
        self.write(ev="open", open=self.open)
        try:
            ureader, uwriter = await asyncio.open_connection(self.host, self.port)
        except OSError:
            cwriter.close()
            self.open -= 1
            self.write(ev="close", open=self.open)
            return
        up = asyncio.ensure_future(self.pipe(creader, uwriter))
        down = asyncio.ensure_future(self.pipe(ureader, cwriter))
        await up  # the client's side closed (or failed)
        self.open -= 1
        self.write(ev="close", open=self.open)
        await down


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--log")
    ap.add_argument("--script")  # the test servers' common arguments; unused here
    a = ap.parse_args()
    p = Proxy(a.target, a.delay, a.log)
    server = await asyncio.start_server(p.handle, "127.0.0.1", 0)
    print("PORT %d" % server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
