#!/usr/bin/python3
"""Verifies a message's DKIM signatures with dkimpy (Debian python3-dkim),
an implementation independent of smtppool. The selector's public key comes
from a file instead of DNS.

    dkim_verify.py message.eml public_key.pem [more_public_keys.pem ...]

Prints "ok" and exits 0 when every signature verifies, else "fail: why"."""
import base64
import sys

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def txt_record(path):
    pub = serialization.load_pem_public_key(open(path, "rb").read())
    if isinstance(pub, ed25519.Ed25519PublicKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def main():
    msg = open(sys.argv[1], "rb").read()
    records = {}
    for path in sys.argv[2:]:
        rec = txt_record(path)
        records["ed25519" if b"k=ed25519" in rec else "rsa"] = rec
    n = msg.count(b"DKIM-Signature:")

    def dnsfunc(name, timeout=5):
        # selector "rsa..." / "ed..." decides which key answers
        sel = name.decode() if isinstance(name, bytes) else name
        return records["ed25519" if sel.startswith("ed") else "rsa"]

    d = dkim.DKIM(msg)
    for i in range(n):
        try:
            good = d.verify(idx=i, dnsfunc=dnsfunc)
        except dkim.DKIMException as e:
            print("fail: signature %d: %s" % (i, e))
            sys.exit(1)
        if not good:
            print("fail: signature %d does not verify" % i)
            sys.exit(1)
    print("ok" if n else "fail: no signature")
    sys.exit(0 if n else 1)


main()
