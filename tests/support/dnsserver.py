#!/usr/bin/python3
"""A scriptable DNS server for the specs (UDP, 127.0.0.1, a port it picks).

    dnsserver.py --script script.json --log events.jsonl

The script maps names to answers: {"names": {"fast.test": {"a": "127.0.0.1"},
"slow.test": {"a": "127.0.0.1", "delay": 1.5}}}. An A query for a listed
name gets its address after `delay` seconds; AAAA gets an empty answer; any
other name gets NXDOMAIN. Prints "PORT n" once listening; logs each query
as a JSON line {"ev": "query", "name": ..., "type": ..., "t": ...}."""
import argparse
import asyncio
import json
import socket
import struct
import time


def parse_question(data):
    qdcount = struct.unpack("!H", data[4:6])[0]
    if qdcount < 1:
        return None
    i, labels = 12, []
    while True:
        n = data[i]
        i += 1
        if n == 0:
            break
        labels.append(data[i:i + n].decode("ascii", "replace"))
        i += n
    qtype, qclass = struct.unpack("!HH", data[i:i + 4])
    return ".".join(labels).lower(), qtype, data[12:i + 4]


def answer(query, question, rcode, addr=None):
    ident, flags = struct.unpack("!HH", query[:4])
    flags = 0x8000 | (flags & 0x0100) | 0x0080 | rcode  # QR, RD copied, RA
    ancount = 1 if addr else 0
    out = struct.pack("!HHHHHH", ident, flags, 1, ancount, 0, 0) + question
    if addr:
        out += struct.pack("!HHHLH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(addr)
    return out


class Server(asyncio.DatagramProtocol):
    def __init__(self, script, log):
        self.names = {k.lower(): v for k, v in script.get("names", {}).items()}
        self.log = log

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, peer):
        q = parse_question(data)
        if not q:
            return
        name, qtype, question = q
        with open(self.log, "a") as f:
            f.write(json.dumps({"ev": "query", "name": name, "type": qtype, "t": time.time()}) + "\n")
        entry = self.names.get(name)
        if entry is None:
            reply = answer(data, question, 3)  # NXDOMAIN
        elif qtype == 1:
            reply = answer(data, question, 0, entry["a"])
        else:
            reply = answer(data, question, 0)
        delay = entry.get("delay", 0) if entry else 0
        asyncio.get_event_loop().call_later(delay, self.transport.sendto, reply, peer)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--script")
    ap.add_argument("--log")
    args = ap.parse_args()
    script = json.load(open(args.script)) if args.script else {}
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    transport, _ = loop.run_until_complete(
        loop.create_datagram_endpoint(lambda: Server(script, args.log), local_addr=("127.0.0.1", 0)))
    print("PORT %d" % transport.get_extra_info("sockname")[1], flush=True)
    loop.run_forever()


if __name__ == "__main__":
    main()
