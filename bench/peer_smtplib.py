#!/usr/bin/python3
"""The peer client for `make bench`: Python's smtplib sending N messages over
one reused connection (its usual pooled use), as fast as it can."""
import smtplib
import sys
import time

port, n, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
body = ("x" * 70 + "\r\n") * (size // 72)
t = time.monotonic()
s = smtplib.SMTP("127.0.0.1", port)
s.ehlo("bench")
for i in range(n):
    msg = "From: a@x.test\r\nTo: b@y.test\r\nSubject: %d\r\n\r\n%s" % (i, body)
    s.sendmail("a@x.test", ["b@y.test"], msg)
s.quit()
print("%.4f" % (time.monotonic() - t))
