#!/usr/bin/python3
"""Hostile SMTP servers for smtppool's hardening and chaos specs.

A small SMTP server written on asyncio streams (not aiosmtpd: the faults here
happen inside replies and inside DATA, below what aiosmtpd lets a handler
touch). One JSON script picks the behaviours; all of them are seeded, so a
failing run can be repeated:

    hostile.py --script script.json --log events.jsonl

It binds 127.0.0.1 on a free port (or --port) and prints "PORT <n>" once it listens.

Script keys (all optional):

    seed            random seed (default 1)
    auth            mechanisms to offer: ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"]
    echo_auth       answer every AUTH exchange 535, echoing what the client
                    sent: its lines as they came, and decoded (NUL as space);
                    "fold": each line split over two reply lines; "recode":
                    the secret alone, base64 again; "lower": decoded,
                    lower-cased
    drip            {"phase": "greeting"|"EHLO"|"DATA_END"|"all", "interval": s}:
                    that reply (every reply with "all") is written one byte
                    every `interval` seconds
    slow_read       {"lines": n, "delay": s}: in DATA, sleep `delay` seconds
                    after every n lines, with a 4 KB receive buffer, so the
                    client's writes block and come back short
    ehlo_lines      extra EHLO keyword lines (a long multi-line reply)
    rcptmax         advertise LIMITS RCPTMAX=n; RCPTs beyond n in one
                    transaction get 452 4.5.3
    cap             421 to MAIL after this many transactions, then close
    cap_keep_open   answer the cap with `cap_reply` and keep the session open
    cap_reply       default "421 4.7.0 Maximum message count per session reached"
    cap_delay       seconds to wait before answering the cap (its 421 then
                    comes apart from the replies before it)
    cap_reset       after the cap's 421, reset the connection (RST) instead
                    of closing it: the client's next write fails
    cap_sessions    the cap applies to the first N sessions only
    p_tempfail      chance a MAIL gets 451 (the session stays open)
    p_421           chance a MAIL gets 421 and the connection closes
    p_eof_rcpt      chance the connection closes on a RCPT
    p_reset_data    chance the connection is reset in the middle of DATA
    p_drop_dot      chance the connection closes after the final dot, before
                    any reply (the message counts as delivered: a real
                    server may well have queued it)
    p_drip_dot      chance the reply to the final dot drips at `drip_interval`
                    seconds a byte (the message is accepted when it starts)
    drip_interval   default 0.05
    chunking        advertise CHUNKING and take BDAT (RFC 3030): each chunk
                    "250 <n> octets", the last one queues the message
    reject_rcpt     a substring: a RCPT holding it gets 550 5.1.1
    hold_after      after this many messages in a session, stop replying
                    (messages that arrive are logged "unconfirmed"), and
                    close once nothing has come for 0.3 s

The log has one JSON line per event: session (a connection), cmd (with the
verb and argument, unless "quiet"), message (id from the X-Test-Id header or
Message-ID, rcpt, status accepted | unconfirmed | rejected), auth (the lines
received), fault.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import signal
import socket
import struct
import time


class Server:
    def __init__(self, script, log_path):
        self.s = script
        self.rng = random.Random(script.get("seed", 1))
        self.log_f = open(log_path, "a", encoding="utf-8") if log_path else None
        self.sessions = 0
        self.quiet = script.get("quiet", False)

    def log(self, **rec):
        if self.log_f:
            rec["t"] = round(time.time(), 4)
            self.log_f.write(json.dumps(rec) + "\n")
            self.log_f.flush()

    def chance(self, key):
        p = self.s.get(key, 0)
        return p > 0 and self.rng.random() < p

    async def handle(self, reader, writer):
        self.sessions += 1
        sid = self.sessions
        self.log(ev="session", s=sid)
        sess = Session(self, sid, reader, writer)
        try:
            await sess.run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not sess.closed:
                try:
                    writer.close()
                except Exception:
                    pass


class Session:
    def __init__(self, srv, sid, reader, writer):
        self.srv, self.sid, self.r, self.w = srv, sid, reader, writer
        self.tx = 0
        self.closed = False
        self.holding = False
        self.reset_tx()

    def reset_tx(self):
        self.mail = None
        self.rcpts = []
        self.chunks = []

    async def reply(self, text, phase=None):
        if self.holding:  # hold_after: read on, answer nothing
            return
        data = (text + "\r\n").encode("latin-1")
        drip = self.srv.s.get("drip")
        if drip and (phase == drip.get("phase") or drip.get("phase") == "all"):
            self.srv.log(ev="fault", s=self.sid, do="drip", phase=phase)
            for i in range(len(data)):
                self.w.write(data[i:i + 1])
                await self.w.drain()
                await asyncio.sleep(drip.get("interval", 0.2))
            return
        self.w.write(data)
        await self.w.drain()

    async def drip(self, text, interval):
        data = (text + "\r\n").encode("latin-1")
        for i in range(len(data)):
            self.w.write(data[i:i + 1])
            await self.w.drain()
            await asyncio.sleep(interval)

    def close(self):
        self.closed = True
        self.w.close()

    def reset(self):
        self.closed = True
        sock = self.w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.w.transport.abort()

    async def line(self):
        if self.holding:
            try:
                l = await asyncio.wait_for(self.r.readline(), 0.3)
            except asyncio.TimeoutError:
                self.srv.log(ev="fault", s=self.sid, do="hold_close")
                self.close()
                raise ConnectionError("held")
        else:
            l = await self.r.readline()
        if not l:
            raise ConnectionError("eof")
        return l.decode("latin-1").rstrip("\r\n")

    def capped(self):
        s = self.srv.s
        cap = s.get("cap")
        if cap is None or self.tx < cap:
            return False
        return "cap_sessions" not in s or self.sid <= s["cap_sessions"]

    async def run(self):
        s = self.srv.s
        await self.reply("220 hostile.test ESMTP", "greeting")
        while True:
            l = await self.line()
            verb, _, arg = l.partition(" ")
            verb = verb.upper()
            if not self.srv.quiet:
                self.srv.log(ev="cmd", s=self.sid, cmd=verb, arg=arg)
            if verb in ("EHLO", "HELO"):
                self.reset_tx()
                if verb == "HELO":
                    await self.reply("250 hostile.test")
                    continue
                lines = ["hostile.test", "PIPELINING", "8BITMIME"] + list(s.get("ehlo_lines", []))
                if s.get("chunking"):
                    lines.append("CHUNKING")
                if s.get("auth"):
                    lines.append("AUTH " + " ".join(s["auth"]))
                if s.get("rcptmax"):
                    lines.append("LIMITS RCPTMAX=%d" % s["rcptmax"])
                out = "\r\n".join(("250-" if i < len(lines) - 1 else "250 ") + x for i, x in enumerate(lines))
                await self.reply(out, "EHLO")
            elif verb == "AUTH":
                if not await self.auth(arg):
                    return
            elif verb == "MAIL":
                if self.capped():
                    self.srv.log(ev="fault", s=self.sid, do="cap", tx=self.tx)
                    if s.get("cap_delay"):
                        await asyncio.sleep(s["cap_delay"])
                    await self.reply(s.get("cap_reply", "421 4.7.0 Maximum message count per session reached"))
                    if s.get("cap_reset"):
                        return self.reset()
                    if not s.get("cap_keep_open"):
                        return self.close()
                    continue
                if self.srv.chance("p_421"):
                    self.srv.log(ev="fault", s=self.sid, do="421")
                    await self.reply("421 4.3.2 Service shutting down")
                    return self.close()
                if self.srv.chance("p_tempfail"):
                    self.srv.log(ev="fault", s=self.sid, do="tempfail")
                    await self.reply("451 4.3.0 Temporary failure, try again")
                    continue
                self.reset_tx()
                self.mail = arg
                await self.reply("250 2.1.0 OK")
            elif verb == "RCPT":
                if self.srv.chance("p_eof_rcpt"):
                    self.srv.log(ev="fault", s=self.sid, do="eof_rcpt")
                    return self.close()
                if self.mail is None:
                    await self.reply("503 5.5.1 MAIL first")
                elif s.get("reject_rcpt") and s["reject_rcpt"] in arg:
                    await self.reply("550 5.1.1 no such user")
                elif s.get("rcptmax") and len(self.rcpts) >= s["rcptmax"]:
                    await self.reply("452 4.5.3 Too many recipients")
                else:
                    self.rcpts.append(arg)
                    await self.reply("250 2.1.5 OK")
            elif verb == "DATA":
                if self.mail is None or not self.rcpts:
                    await self.reply("503 5.5.1 no valid recipients")
                    continue
                await self.reply("354 go ahead")
                if not await self.data():
                    return
            elif verb == "BDAT" and s.get("chunking"):
                if not await self.bdat(arg):
                    return
            elif verb == "RSET":
                self.reset_tx()
                await self.reply("250 2.0.0 OK")
            elif verb == "NOOP":
                await self.reply("250 2.0.0 OK")
            elif verb == "QUIT":
                await self.reply("221 2.0.0 bye")
                return self.close()
            else:
                await self.reply("502 5.5.2 unknown command")

    async def bdat(self, arg):
        """One BDAT chunk (its bytes read whatever happens); the last one
        ends the message. False when the session ended."""
        parts = arg.split()
        n = int(parts[0])
        last = len(parts) > 1 and parts[1].upper() == "LAST"
        self.chunks.append(await self.r.readexactly(n))
        if not last:
            await self.reply("250 2.0.0 %d octets received" % n)
            return True
        text = b"".join(self.chunks).decode("latin-1")
        self.chunks = []
        if self.mail is None or not self.rcpts:
            self.reset_tx()
            await self.reply("503 5.5.1 no valid recipients")
            return True
        return await self.finish_message(text)

    async def data(self):
        """Reads the message to the final dot; False when the session ended."""
        s = self.srv.s
        reset_mid = self.srv.chance("p_reset_data")
        lines = []
        slow = s.get("slow_read")
        while True:
            l = await self.r.readline()
            if not l:
                raise ConnectionError("eof in data")
            if slow and len(lines) % slow.get("lines", 16) == 0:
                await asyncio.sleep(slow.get("delay", 0.001))
            if reset_mid:
                self.srv.log(ev="fault", s=self.sid, do="reset_data")
                self.reset()
                return False
            if l in (b".\r\n", b".\n"):
                break
            lines.append(l[1:] if l.startswith(b".") else l)
        return await self.finish_message(b"".join(lines).decode("latin-1"))

    async def finish_message(self, text):
        """A whole message (DATA or BDAT): logged, then answered (or not)."""
        s = self.srv.s
        headers = {}
        for h in text.split("\r\n"):
            if h == "":
                break
            name, _, value = h.partition(":")
            headers.setdefault(name.strip().lower(), value.strip())
        mid = headers.get("x-test-id") or headers.get("message-id")
        self.tx += 1
        rec = dict(ev="message", s=self.sid, tx=self.tx, id=mid, rcpt=list(self.rcpts), mail=self.mail,
                   size=len(text), sha256=hashlib.sha256(text.encode("latin-1")).hexdigest())
        mail_ok = self.mail is not None
        self.reset_tx()
        if self.holding or (s.get("hold_after") is not None and self.tx > s["hold_after"]):
            if not self.holding:
                self.srv.log(ev="fault", s=self.sid, do="hold")
            self.holding = True
            self.srv.log(status="unconfirmed", **rec)
            return True
        if self.srv.chance("p_drop_dot"):
            self.srv.log(status="unconfirmed", **rec)
            self.srv.log(ev="fault", s=self.sid, do="drop_dot")
            self.close()
            return False
        if not mail_ok:
            await self.reply("503 5.5.1 no transaction")
            return True
        self.srv.log(status="accepted", **rec)
        if self.srv.chance("p_drip_dot"):
            self.srv.log(ev="fault", s=self.sid, do="drip_dot")
            await self.drip("250 2.0.0 OK queued as s%d-t%d" % (self.sid, self.tx), s.get("drip_interval", 0.05))
            return True
        await self.reply("250 2.0.0 OK queued as s%d-t%d" % (self.sid, self.tx), "DATA_END")
        return True

    async def auth(self, arg):
        """An AUTH exchange that always fails; with echo_auth the 535 repeats
        what the client sent. False when the session ended."""
        s = self.srv.s
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        got = []
        if initial:
            got.append(initial)
        if mech == "LOGIN":
            if not got:
                await self.reply("334 VXNlcm5hbWU6")
                got.append(await self.line())
            await self.reply("334 UGFzc3dvcmQ6")
            got.append(await self.line())
        elif mech == "CRAM-MD5":
            await self.reply("334 " + base64.b64encode(b"<1896.697170952@hostile.test>").decode())
            got.append(await self.line())
        elif mech in ("PLAIN", "XOAUTH2") and not initial:
            await self.reply("334 ")
            got.append(await self.line())
        self.srv.log(ev="auth", s=self.sid, mech=mech, lines=got)
        if not s.get("echo_auth"):
            await self.reply("535 5.7.8 Authentication credentials invalid")
            return True
        decoded = []
        for g in got:
            try:
                decoded.append(base64.b64decode(g).decode("latin-1").replace("\0", " ").replace("\1", " "))
            except Exception:
                decoded.append("?")
        def printable(t):
            return "".join(c if 32 <= ord(c) < 127 else "?" for c in t)
        mode = s.get("echo_auth")
        if mode == "fold":  # each line it got split over two reply lines
            parts = []
            for g in got:
                half = len(g) // 2
                parts += ["535-5.7.8 got " + printable(g[:half]), "535-5.7.8 " + printable(g[half:])]
            await self.reply("\r\n".join(parts) + "\r\n535 5.7.8 failed")
            return True
        if mode == "recode":  # the secret (the last NUL-separated field) re-encoded alone
            secrets = [base64.b64encode(d.split(" ")[-1].encode("latin-1")).decode() for d in decoded]
            await self.reply("535 5.7.8 bad secret: " + printable(" | ".join(secrets)))
            return True
        if mode == "lower":  # what it decoded, lower-cased
            await self.reply("535 5.7.8 decoded: " + printable(" | ".join(decoded)).lower())
            return True
        echo = printable(" | ".join("AUTH %s %s" % (mech, g) for g in got))
        await self.reply("535-5.7.8 Authentication failed for: " + echo +
                         "\r\n535 5.7.8 decoded: " + printable(" | ".join(decoded)))
        return True


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--script")
    ap.add_argument("--log")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    script = {}
    if a.script:
        with open(a.script, encoding="utf-8") as f:
            script = json.load(f)
    if not isinstance(script, dict):
        script = {}
    srv = Server(script, a.log)
    slow = "slow_read" in script
    server = await asyncio.start_server(srv.handle, "127.0.0.1", a.port, limit=4096 if slow else 1 << 20,
                                        reuse_address=True)
    if slow:  # a small window: the client's writes fill it and block
        for sk in server.sockets:
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    print("PORT %d" % server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
