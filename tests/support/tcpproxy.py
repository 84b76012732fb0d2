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
accept until the client's side has closed. The counting is done in the
protocol callbacks the event loop calls as it reads the sockets. A client
whose last bytes and FIN arrive together is read in two turns (the bytes,
then the end), so its close can be logged a turn after an accept that came
later: readers allow a close a few milliseconds early.

With a delay, each direction is a delay line: a chunk is written `delay`
seconds after it was read, and reads never wait for writes, so chunks in
flight overlap as on a real link."""

import argparse
import asyncio
import collections
import json
import os
import signal
import time


class Line:
    """One direction: writes each chunk to `transport` `delay` s after put()."""

    def __init__(self, loop, delay):
        self.loop, self.delay = loop, delay
        self.q = collections.deque()
        self.transport = None
        self.pending = []  # chunks before the transport exists
        self.eof = False
        self.timer = None

    def put(self, data):
        if not self.delay:
            self._write(data)
            return
        self.q.append((self.loop.time() + self.delay, data))
        if self.timer is None:
            self._arm()

    def _arm(self):
        due = self.q[0][0]
        self.timer = self.loop.call_at(due, self._fire)

    def _fire(self):
        self.timer = None
        now = self.loop.time()
        while self.q and self.q[0][0] <= now:
            self._write(self.q.popleft()[1])
        if self.q:
            self._arm()
        elif self.eof:
            self._close()

    def _write(self, data):
        if self.transport is None:
            self.pending.append(data)
        elif not self.transport.is_closing():
            self.transport.write(data)

    def attach(self, transport):
        self.transport = transport
        for d in self.pending:
            transport.write(d)
        self.pending = []
        if self.eof and not self.q:
            self._close()

    def end(self):
        self.eof = True
        if not self.q and self.transport is not None:
            self._close()

    def _close(self):
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Upstream(asyncio.Protocol):
    def __init__(self, client):
        self.client = client

    def data_received(self, data):
        self.client.down.put(data)

    def eof_received(self):
        self.client.down.end()

    def connection_lost(self, exc):
        self.client.down.end()


class Client(asyncio.Protocol):
    def __init__(self, proxy):
        self.p = proxy
        loop = asyncio.get_running_loop()
        self.up = Line(loop, proxy.delay)    # client -> server
        self.down = Line(loop, proxy.delay)  # server -> client
        self.closed = False

    def connection_made(self, transport):
        self.p.open += 1
        self.p.write(ev="open", open=self.p.open)
        self.down.attach(transport)
        asyncio.ensure_future(self.connect())

    async def connect(self):
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(lambda: Upstream(self), self.p.host, self.p.port)
        except OSError:
            self.down.end()
            return
        self.up.attach(transport)

    def data_received(self, data):
        self.up.put(data)

    def _gone(self):
        if not self.closed:
            self.closed = True
            self.p.open -= 1
            self.p.write(ev="close", open=self.p.open)
        self.up.end()

    def eof_received(self):
        self._gone()

    def connection_lost(self, exc):
        self._gone()


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


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--log")
    ap.add_argument("--script")  # the test servers' common arguments; unused here
    a = ap.parse_args()
    p = Proxy(a.target, a.delay, a.log)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(p), "127.0.0.1", 0)
    print("PORT %d" % server.sockets[0].getsockname()[1], flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
