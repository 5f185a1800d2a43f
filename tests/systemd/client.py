#!/usr/bin/python3
"""Real clients for the end-to-end suite, run inside the test container.

  client.py fetch ADDR            print "<bytes> <sha256>" of everything received
  client.py hold ADDR SECONDS     read for SECONDS (or until EOF); print "<bytes> <eof|open>"
  client.py storm ADDR N EXPECT   N connections in a row, each must read exactly EXPECT
                                  (with \\n for newlines); print "<ok> <failed>"

ADDR is HOST:PORT or an absolute Unix socket path.
"""
import hashlib
import socket
import sys
import time


def connect(addr, timeout=30):
    if addr.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(addr)
        return s
    host, port = addr.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def fetch(addr):
    s = connect(addr)
    h, n = hashlib.sha256(), 0
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
    print(n, h.hexdigest())


def hold(addr, seconds):
    s = connect(addr)
    end = time.monotonic() + float(seconds)
    n, state = 0, "open"
    while time.monotonic() < end:
        s.settimeout(max(0.01, end - time.monotonic()))
        try:
            b = s.recv(1 << 16)
        except socket.timeout:
            break
        if not b:
            state = "eof"
            break
        n += len(b)
    print(n, state)


def storm(addr, count, expect):
    expect = expect.replace("\\n", "\n").encode()
    ok = failed = 0
    for _ in range(int(count)):
        try:
            s = connect(addr, timeout=10)
            got = b""
            while True:
                b = s.recv(65536)
                if not b:
                    break
                got += b
            s.close()
            if got == expect:
                ok += 1
            else:
                failed += 1
                print("unexpected:", got[:80], file=sys.stderr)
        except OSError as e:
            failed += 1
            print("failed:", e, file=sys.stderr)
    print(ok, failed)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"fetch": fetch, "hold": hold, "storm": storm}[cmd](*args)
