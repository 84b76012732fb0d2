#!/usr/bin/python3
"""A scriptable SMTP server for smtppool's tests: faults on cue.

Built on aiosmtpd (a real SMTP server implementation); every reply passes
through `push`, where a script can replace it with another reply, raw bytes
(garbage, oversized lines, partial replies), an EOF, a TCP reset or a stall.

    faultserver.py --script script.json --log events.jsonl

It binds 127.0.0.1 on a free port and prints "PORT <n>" on stdout once it
listens. The script is a JSON object:

    {
      "pipelining": true,            # advertise PIPELINING (default true)
      "extensions": ["8BITMIME"],    # more EHLO keywords
      "ehlo": "refuse",              # answer EHLO with 502 (HELO fallback)
      "xoauth2_tokens": ["tok"],     # offer AUTH XOAUTH2 (only), accepting these tokens
      "xoauth2_tempfail_first": 1,   # answer the first N AUTH attempts 454
      "max_tx_per_session": 5,       # the session cap: MAIL after N transactions...
      "cap_reply": "421 4.7.0 Maximum message count per session reached",
      "cap_close": true,             # ...is answered cap_reply, then closed if cap_close
      "max_sessions": 2,             # concurrency: a connection over N open at once is
      "sessions_reply": "432 4.3.2 Concurrent connections limit exceeded",  # greeted so, closed
      "mail_per_sec": 200,           # rate: a MAIL past N accepted in the last second is
      "rate_reply": "454 4.7.0 Throttling failure: Maximum sending rate exceeded",  # answered so
      "chunking": true,              # offer CHUNKING and take BDAT (RFC 3030)
      "rules": [                     # first matching rule with uses left wins
        {"on": "MAIL",               # greeting EHLO HELO STARTTLS MAIL RCPT DATA DATA_END RSET NOOP QUIT
         "session": 2,               # only on the 2nd connection (1-based); optional
         "nth": 3,                   # only the 3rd time this phase is seen; optional
         "every": 50,                # only every 50th time; optional
         "match": "reject",          # only when the command argument contains this; optional
         "times": 1,                 # how often the rule fires (default 1, -1 always)
         "do": "reply" | "raw" | "eof" | "reset" | "stall",
         "text": "421 4.4.2 bye",    # for reply: replaces the reply (CRLF added)
         "bytes": "...",             # for raw: written as is (latin-1)
         "repeat": 100000,           # raw: bytes repeated this many times
         "seconds": 5,               # for stall: sleep, then reply normally
         "close": true}              # close the connection after reply/raw
      ]
    }

Everything the server sees goes to the log as JSON lines: connect, chunk
(each read from the socket, as received), cmd, message (envelope and data),
reply, fault, close.
"""

import argparse
import asyncio
import base64
import collections
import json
import os
import signal
import socket
import struct
import time

from aiosmtpd.smtp import SMTP, AuthResult


class Log:
    def __init__(self, path):
        self.f = open(path, "a", encoding="utf-8") if path else None

    def write(self, **rec):
        rec["t"] = time.time()
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()


class State:
    """Shared across connections: the script, counters, the log."""

    def __init__(self, script, log):
        self.script = script
        self.rules = [dict(r, used=0) for r in script.get("rules", [])]
        self.seen = {}
        self.sessions = 0
        self.open = 0  # connections open now
        self.mails = collections.deque()  # when recent MAILs were accepted
        self.log = log

    def throttled(self):
        """The rate limit: True when mail_per_sec MAILs were accepted in the
        last second (the MAIL asking is then refused, and not counted)."""
        limit = self.script.get("mail_per_sec")
        if limit is None:
            return False
        now = time.monotonic()
        while self.mails and now - self.mails[0] >= 1.0:
            self.mails.popleft()
        if len(self.mails) >= limit:
            return True
        self.mails.append(now)
        return False

    def match(self, phase, session, arg):
        n = self.seen.get(phase, 0) + 1
        self.seen[phase] = n
        for r in self.rules:
            if r.get("on") != phase:
                continue
            if "session" in r and r["session"] != session:
                continue
            if "nth" in r and r["nth"] != n:
                continue
            if "every" in r and n % r["every"] != 0:
                continue
            if "match" in r and r["match"] not in (arg or ""):
                continue
            times = r.get("times", 1)
            if times != -1 and r["used"] >= times:
                continue
            r["used"] += 1
            return r
        return None


class Handler:
    def __init__(self, state):
        self.state = state

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        if self.state.script.get("ehlo") == "refuse":
            return ["502 5.5.2 EHLO not supported"]
        session.host_name = hostname
        extra = list(self.state.script.get("extensions", []))
        if self.state.script.get("pipelining", True):
            extra.append("PIPELINING")
        if self.state.script.get("chunking"):
            extra.append("CHUNKING")
        # responses: ['250-host', ..., '250 HELP']; keep the last line last
        body = [r[4:] for r in responses]
        lines = body[:-1] + extra + body[-1:]
        return ["250-" + l for l in lines[:-1]] + ["250 " + lines[-1]]

    async def auth_XOAUTH2(self, server, args):
        """XOAUTH2 as Gmail speaks it: on a bad token, a 334 with a JSON
        error, the client's empty line, then 535."""
        raw = base64.b64decode(args[1]) if len(args) > 1 else b""
        fields = dict(f.split("=", 1) for f in raw.decode("latin-1").split("\x01") if "=" in f)
        token = fields.get("auth", "").replace("Bearer ", "", 1)
        self.state.log.write(ev="auth", s=server.sid, mech="XOAUTH2", user=fields.get("user"))
        self.state.auths = getattr(self.state, "auths", 0) + 1
        if self.state.auths <= self.state.script.get("xoauth2_tempfail_first", 0):
            return AuthResult(success=False, handled=False, message="454 4.7.0 Temporary authentication failure")
        if token in self.state.script.get("xoauth2_tokens", []):
            return AuthResult(success=True)
        err = base64.b64encode(b'{"status":"401","schemes":"bearer"}').decode()
        await server.challenge_auth(err, encode_to_b64=False)
        return AuthResult(success=False, handled=False,
                          message="535 5.7.8 Username and Password not accepted")

    async def handle_DATA(self, server, session, envelope):
        server.phase = "DATA_END"
        server.fresh = True
        server.tx += 1
        # logged by push once the reply is decided: accepted, rejected or unconfirmed
        server.pending = dict(ev="message", s=server.sid, tx=server.tx,
                              mail_from=envelope.mail_from, rcpt=list(envelope.rcpt_tos),
                              data=envelope.original_content.decode("latin-1"))
        return "250 2.0.0 OK queued as s%d-t%d" % (server.sid, server.tx)


class FaultSMTP(SMTP):
    def __init__(self, state, **kw):
        if "xoauth2_tokens" in state.script:
            kw.update(auth_require_tls=False, auth_exclude_mechanism=["PLAIN", "LOGIN"])
        super().__init__(Handler(state), **kw)
        self.state = state
        self.state.sessions += 1
        self.sid = self.state.sessions
        self.phase = "greeting"
        self.fresh = True  # the next push is the first reply to a command: rules apply
        self.tx = 0
        self.pending = None  # the message whose final reply is being pushed

    def log_message(self, status):
        """A message's fate as the server saw it: accepted (2xx sent),
        rejected (4xx/5xx sent) or unconfirmed (connection dropped before the
        reply: a real server may well deliver it)."""
        if self.pending is not None:
            self.state.log.write(status=status, **self.pending)
            self.pending = None

    def connection_made(self, transport):
        self.state.open += 1
        self.counted = True
        limit = self.state.script.get("max_sessions")
        # over the concurrency limit: the greeting refuses (see push)
        self.over = limit is not None and self.state.open > limit
        self.state.log.write(ev="connect", s=self.sid, open=self.state.open)
        super().connection_made(transport)

    def connection_lost(self, exc):
        if self.counted:
            self.counted = False
            self.state.open -= 1
        self.state.log.write(ev="close", s=self.sid)
        super().connection_lost(exc)

    def data_received(self, data):
        self.state.log.write(ev="chunk", s=self.sid, data=data.decode("latin-1"))
        super().data_received(data)

    def _close(self):
        if self.transport is not None:
            self.transport.close()

    def _reset(self):
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    async def push(self, status):
        if self.transport is None:
            return
        text = status.decode("latin-1") if isinstance(status, bytes) else status
        if self.phase == "greeting" and self.over:
            text = self.state.script.get("sessions_reply", "421 4.7.0 too many concurrent connections")
            self.state.log.write(ev="over_sessions", s=self.sid, open=self.state.open)
            self.state.log.write(ev="reply", s=self.sid, phase=self.phase, text=text)
            await super().push(text)
            self._close()
            return
        rule = None
        if self.fresh:
            self.fresh = False
            rule = self.state.match(self.phase, self.sid, getattr(self, "_arg", ""))
        if rule is not None:
            self.state.log.write(ev="fault", s=self.sid, phase=self.phase, do=rule["do"])
            act = rule["do"]
            if act in ("eof", "reset", "raw"):
                self.log_message("unconfirmed")
            if act == "eof":
                self._close()
                return
            if act == "reset":
                self._reset()
                return
            if act == "stall":
                await asyncio.sleep(rule.get("seconds", 3600))
            elif act == "reply":
                text = rule["text"]
            elif act == "raw":
                raw = rule["bytes"] * rule.get("repeat", 1)
                self._writer.write(raw.encode("latin-1"))
                await self._writer.drain()
                self.state.log.write(ev="reply", s=self.sid, phase=self.phase, text=raw[:200])
                if rule.get("close"):
                    self._close()
                return
            if self.transport is None:
                self.log_message("unconfirmed")
                return
            self.log_message("accepted" if text.startswith("2") else "rejected")
            self.state.log.write(ev="reply", s=self.sid, phase=self.phase, text=text)
            await super().push(text)
            if rule.get("close"):
                self._close()
            return
        self.log_message("accepted" if text.startswith("2") else "rejected")
        self.state.log.write(ev="reply", s=self.sid, phase=self.phase, text=text)
        await super().push(status)
        if text.startswith("421"):
            self._close()

    async def _cmd(self, phase, arg, method):
        self.phase = phase
        self.fresh = True
        self._arg = arg
        self.state.log.write(ev="cmd", s=self.sid, cmd=phase, arg=arg)
        await method(arg)

    async def smtp_EHLO(self, arg):
        await self._cmd("EHLO", arg, super().smtp_EHLO)

    async def smtp_HELO(self, arg):
        await self._cmd("HELO", arg, super().smtp_HELO)

    async def smtp_MAIL(self, arg):
        cap = self.state.script.get("max_tx_per_session")
        if cap is not None and self.tx >= cap:
            self.phase = "MAIL"
            self.state.log.write(ev="cmd", s=self.sid, cmd="MAIL", arg=arg)
            self.state.log.write(ev="cap", s=self.sid, tx=self.tx)
            text = self.state.script.get("cap_reply", "421 4.7.0 session message limit reached")
            await SMTP.push(self, text)
            if self.state.script.get("cap_close", True) or text.startswith("421"):
                self._close()
            return
        if self.state.throttled():
            self.phase = "MAIL"
            self.state.log.write(ev="cmd", s=self.sid, cmd="MAIL", arg=arg)
            self.state.log.write(ev="throttle", s=self.sid, tx=self.tx)
            await SMTP.push(self, self.state.script.get(
                "rate_reply", "454 4.7.0 Throttling failure: Maximum sending rate exceeded"))
            return
        await self._cmd("MAIL", arg, super().smtp_MAIL)

    async def smtp_BDAT(self, arg):
        """BDAT (RFC 3030): a chunk of exactly n octets follows the command;
        LAST ends the message, whose reply is the transaction's."""
        self.phase = "BDAT"
        self.fresh = True
        self._arg = arg
        self.state.log.write(ev="cmd", s=self.sid, cmd="BDAT", arg=arg)
        parts = (arg or "").split()
        if not self.state.script.get("chunking") or not parts or not parts[0].isdigit() or len(parts) > 2 \
                or (len(parts) == 2 and parts[1].upper() != "LAST"):
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            return
        n, last = int(parts[0]), len(parts) == 2
        chunk = await self._reader.readexactly(n) if n else b""
        self.state.log.write(ev="bdat_chunk", s=self.sid, n=len(chunk))
        if not self.envelope.rcpt_tos:
            self.bdat = None
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        self.bdat = (getattr(self, "bdat", None) or b"") + chunk
        if not last:
            await self.push("250 2.0.0 %d octets received" % n)
            return
        self.envelope.original_content = self.envelope.content = self.bdat
        self.bdat = None
        status = await self.event_handler.handle_DATA(self, self.session, self.envelope)
        self._set_post_data_state()
        await self.push(status)

    async def smtp_RCPT(self, arg):
        await self._cmd("RCPT", arg, super().smtp_RCPT)

    async def smtp_DATA(self, arg):
        await self._cmd("DATA", arg, super().smtp_DATA)

    async def smtp_RSET(self, arg):
        self.bdat = None
        await self._cmd("RSET", arg, super().smtp_RSET)

    async def smtp_NOOP(self, arg):
        await self._cmd("NOOP", arg, super().smtp_NOOP)

    async def smtp_STARTTLS(self, arg):
        await self._cmd("STARTTLS", arg, super().smtp_STARTTLS)

    async def smtp_QUIT(self, arg):
        await self._cmd("QUIT", arg, super().smtp_QUIT)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--script", help="JSON file (default: no faults)")
    ap.add_argument("--log", help="JSON-lines event log")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    script = {}
    if a.script:
        with open(a.script, encoding="utf-8") as f:
            script = json.load(f)
    if not isinstance(script, dict):  # an empty Lua table encodes as []
        script = {}
    state = State(script, Log(a.log))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FaultSMTP(state, hostname="fault.test", ident="faultserver",
                          enable_SMTPUTF8=True, decode_data=False),
        "127.0.0.1", a.port)
    port = server.sockets[0].getsockname()[1]
    print("PORT %d" % port, flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    # The log is flushed line by line; nothing else needs a graceful end, and
    # waiting for stalled handlers would only slow the tests down.
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
