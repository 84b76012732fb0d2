#!/usr/bin/python3
"""A peer client for `make bench`: Python's smtplib sending N messages over
one reused connection (its usual pooled use), as fast as it can; with
PER_CONN, it reconnects after that many messages (a session cap).

    peer_smtplib.py PORT N SIZE [PER_CONN]"""
import smtplib
import sys
import time

port, n, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
per = int(sys.argv[4]) if len(sys.argv) > 4 and int(sys.argv[4]) > 0 else 0
body = ("x" * 70 + "\r\n") * (size // 72)
t = time.monotonic()
s = None
for i in range(n):
    if s is None:
        s = smtplib.SMTP("127.0.0.1", port)
        s.ehlo("bench")
        sent = 0
    msg = "From: a@x.test\r\nTo: b@y.test\r\nSubject: %d\r\n\r\n%s" % (i, body)
    s.sendmail("a@x.test", ["b@y.test"], msg)
    sent += 1
    if per and sent == per:
        s.quit()
        s = None
if s is not None:
    s.quit()
print("%.4f" % (time.monotonic() - t))
