#!/usr/bin/env python3
"""The host end of a tap for the virtio-net tests.

Usage: net_peer.py <ifname>
Listens on <ifname> for Ethernet frames of type 0x88b5 and prints each one
it receives as "RECV src=<mac> dst=<mac> len=<n> payload=<text>". Reads
commands on stdin: "send <dst-mac> <payload text>" sends one such frame
(padded to 60 bytes). Prints READY once listening; exits at end of stdin.
"""
import socket
import sys
import threading

ETHERTYPE = 0x88B5
SRC = bytes.fromhex("020000000001")


def mac(b):
    return ":".join(f"{x:02x}" for x in b)


def main():
    ifname = sys.argv[1]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    sock.bind((ifname, 0))

    def receive():
        while True:
            data, addr = sock.recvfrom(65536)
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            payload = data[14:].rstrip(b"\0").decode("ascii", "replace")
            print(
                f"RECV src={mac(data[6:12])} dst={mac(data[:6])} len={len(data)} payload={payload}",
                flush=True,
            )

    threading.Thread(target=receive, daemon=True).start()
    print("READY", flush=True)
    for line in sys.stdin:
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0] == "send":
            frame = bytes.fromhex(parts[1].replace(":", "")) + SRC + ETHERTYPE.to_bytes(2, "big")
            frame += parts[2].rstrip("\n").encode()
            frame += b"\0" * max(0, 60 - len(frame))
            sock.send(frame)
            print(f"SENT {parts[2].strip()}", flush=True)


if __name__ == "__main__":
    main()
