#!/usr/bin/python3
"""Reads a message with Python's email package (default policy) and prints
what a real parser made of it, as JSON: defects, decoded headers, the MIME
structure and each leaf part's decoded bytes (sha256 and size) or text."""
import email
import email.policy
import hashlib
import json
import sys


def structure(part):
    if part.is_multipart():
        return "%s(%s)" % (part.get_content_type(), ",".join(structure(p) for p in part.iter_parts()))
    return part.get_content_type()


def main():
    data = open(sys.argv[1], "rb").read()
    msg = email.message_from_bytes(data, policy=email.policy.default)
    defects, leaves = [], []
    for part in msg.walk():
        defects += [type(d).__name__ + ": " + str(d) for d in part.defects]
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True) or b""
        leaf = {"type": part.get_content_type(), "filename": part.get_filename(),
                "cid": part.get("Content-ID"), "disposition": part.get_content_disposition(),
                "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
        if part.get_content_maintype() == "text":
            leaf["text"] = part.get_content().replace("\r\n", "\n")  # canonical CRLF back to LF
        leaves.append(leaf)
    out = {
        "defects": defects,
        "subject": msg.get("Subject"),
        "from_name": msg["From"].addresses[0].display_name if msg["From"] else None,
        "from_addr": msg["From"].addresses[0].addr_spec if msg["From"] else None,
        "to": [a.addr_spec for a in msg["To"].addresses] if msg["To"] else [],
        "to_names": [a.display_name for a in msg["To"].addresses] if msg["To"] else [],
        "header_names": [k for k in msg.keys()],
        "structure": structure(msg),
        "leaves": leaves,
        "max_line": max((len(l) for l in data.split(b"\r\n")), default=0),
    }
    json.dump(out, sys.stdout)


main()
