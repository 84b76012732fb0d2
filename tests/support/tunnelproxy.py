#!/usr/bin/python3
"""A SOCKS5 and HTTP CONNECT proxy for the specs (127.0.0.1, a port it picks).

    tunnelproxy.py --script script.json --log events.jsonl

The script: {"kind": "socks5" | "http", "user": "u", "password": "p"} (no
user: no authentication). The first bytes tell SOCKS5 (0x05) from HTTP, so
either protocol is served; "kind" only decides which one credentials are
required for (both, when given). Prints "PORT n" once listening; logs
{"ev": "tunnel", "proto", "host", "port", "auth"} for each tunnel opened
and {"ev": "refused", "why"} for each refusal.
"""
import argparse
import asyncio
import base64
import json
import struct
import time


class Log:
    def __init__(self, path):
        self.path = path

    def write(self, **kw):
        kw["t"] = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(kw) + "\n")


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def splice(cr, cw, host, port):
    tr, tw = await asyncio.open_connection(host, port)
    await asyncio.gather(pipe(cr, tw), pipe(tr, cw))


def make_handler(script, log):
    user, password = script.get("user"), script.get("password")

    async def socks5(r, w):
        n = (await r.readexactly(1))[0]  # the version byte was read by handle
        methods = await r.readexactly(n)
        want = 2 if user is not None else 0
        if want not in methods:
            w.write(b"\x05\xff")
            log.write(ev="refused", why="no acceptable method")
            w.close()
            return
        w.write(bytes([5, want]))
        authed = False
        if want == 2:
            ver, ul = await r.readexactly(2)
            u = (await r.readexactly(ul)).decode()
            pl = (await r.readexactly(1))[0]
            p = (await r.readexactly(pl)).decode()
            if u != user or p != password:
                w.write(b"\x01\x01")
                log.write(ev="refused", why="bad credentials")
                w.close()
                return
            w.write(b"\x01\x00")
            authed = True
        ver, cmd, _, atyp = await r.readexactly(4)
        if atyp == 3:
            host = (await r.readexactly((await r.readexactly(1))[0])).decode()
        elif atyp == 1:
            host = ".".join(str(b) for b in await r.readexactly(4))
        else:
            w.write(b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00")
            w.close()
            return
        port = struct.unpack("!H", await r.readexactly(2))[0]
        try:
            tr, tw = await asyncio.open_connection(host, port)
        except OSError:
            w.write(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
            log.write(ev="refused", why="target refused", host=host, port=port)
            w.close()
            return
        log.write(ev="tunnel", proto="socks5", host=host, port=port, auth=authed)
        w.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", port))
        await asyncio.gather(pipe(r, tw), pipe(tr, w))

    async def http(r, w, first):
        head = first + await r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
        authed = False
        if user is not None:
            want = "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()
            if headers.get("proxy-authorization") != want:
                w.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n")
                log.write(ev="refused", why="bad credentials")
                w.close()
                return
            authed = True
        host, port = target.rsplit(":", 1)
        try:
            tr, tw = await asyncio.open_connection(host, int(port))
        except OSError:
            w.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            log.write(ev="refused", why="target refused", host=host, port=int(port))
            w.close()
            return
        log.write(ev="tunnel", proto="http", host=host, port=int(port), auth=authed)
        w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(r, tw), pipe(tr, w))

    async def handle(r, w):
        try:
            first = await r.readexactly(1)
            if first == b"\x05":
                await socks5(r, w)
            else:
                await http(r, w, first)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            w.close()

    return handle


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--script")
    ap.add_argument("--log")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    script = json.load(open(a.script)) if a.script else {}
    if isinstance(script, list):
        script = {}
    srv = await asyncio.start_server(make_handler(script, Log(a.log)), "127.0.0.1", a.port)
    print("PORT %d" % srv.sockets[0].getsockname()[1], flush=True)
    async with srv:
        await srv.serve_forever()


asyncio.run(main())
