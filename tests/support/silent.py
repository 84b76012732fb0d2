#!/usr/bin/python3
"""A server that never answers, for specs of connects that hang.

    silent.py --script script.json [--log events.jsonl] [--port n]

Script keys: "mode" is "accept" (connections are accepted and held; nothing
is ever written, so a TLS handshake waits for its ServerHello) or "backlog"
(nothing is accepted and the listen queue is kept full, so a connect waits
for its SYN's answer). Prints "PORT <n>" once it listens; runs until killed.
"""

import argparse
import json
import signal
import socket
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--script")
    ap.add_argument("--log")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    script = json.load(open(a.script)) if a.script else {}
    mode = script.get("mode", "accept")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", a.port))
    held = []
    if mode == "backlog":
        s.listen(0)
        port = s.getsockname()[1]
        for _ in range(3):  # fills the queue: later SYNs go unanswered
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            held.append(c)
        print("PORT %d" % port, flush=True)
        while True:
            time.sleep(3600)
    s.listen(16)
    print("PORT %d" % s.getsockname()[1], flush=True)
    while True:
        conn, _ = s.accept()
        held.append(conn)


if __name__ == "__main__":
    main()
