#!/usr/bin/env python3
"""The host end of a tap for `berth-bench net`.

  net_bench_peer.py recv <ifname>
      Counts arriving 0x88b5 frames whose payload starts with BENCH. Prints
      READY, then on end of stdin (or 3 s after the last frame once any came)
      "RESULT frames=<n> bytes=<b>".
  net_bench_peer.py send <ifname> <dst-mac> <frames-per-second> <frame-bytes>
      Prints READY, waits for a line on stdin, then sends BENCH frames at
      that rate until the next line (or end of stdin), then a few END
      frames, and prints "SENT frames=<n>". A tap drops what the guest does
      not take, so the rate is set above the guest's and it never starves.
"""
import select
import socket
import sys
import time

ETHERTYPE = 0x88B5
SRC = bytes.fromhex("020000000002")


def recv(ifname):
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    sock.bind((ifname, 0))
    print("READY", flush=True)
    frames = total = 0
    last = None
    while True:
        ready, _, _ = select.select([sock, sys.stdin], [], [], 0.5)
        if sys.stdin in ready and not sys.stdin.readline():
            break
        if sock in ready:
            while True:
                try:
                    data, addr = sock.recvfrom(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if addr[2] != socket.PACKET_OUTGOING and data[14:19] == b"BENCH":
                    frames += 1
                    total += len(data)
                    last = time.monotonic()
        if last is not None and time.monotonic() - last > 3:
            break
    print(f"RESULT frames={frames} bytes={total}", flush=True)


def send(ifname, dst, rate, size):
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 20)
    sock.bind((ifname, 0))
    head = bytes.fromhex(dst.replace(":", "")) + SRC + ETHERTYPE.to_bytes(2, "big")
    print("READY", flush=True)
    sys.stdin.readline()
    sent = 0
    start = time.monotonic()
    batch = 64
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0)
        if ready:
            break
        for _ in range(batch):
            payload = f"BENCH {sent} ".encode()
            frame = head + payload + b"x" * (size - len(head) - len(payload))
            try:
                sock.send(frame)
            except OSError:
                pass
            sent += 1
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    end = head + b"END" + b"\0" * (60 - len(head) - 3)
    for _ in range(5):
        time.sleep(0.05)
        sock.send(end)
    print(f"SENT frames={sent}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "recv":
        recv(sys.argv[2])
    else:
        send(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
