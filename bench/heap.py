#!/usr/bin/env python3
"""What a slow reader costs the daemon's memory: clients that connect to a
bulk command and read nothing.

    bench/heap.py                      # every row, 200 slow clients each
    bench/heap.py --clients 100 --only socketpair,copy,splice
    bench/heap.py --bin-dir /tmp/old   # another build (its splice-relay and
                                       # examples/bench-producer)
    bench/heap.py --baseline /tmp/old/splice-relay --write
                                       # that build beside this one, row by row

For each row a daemon is started on 127.0.0.1 with one service whose command
writes without end (`bench-producer bulk`, 1 MiB writes; text lines for
WebSocket text). First WARM clients connect and read nothing, so that what
every daemon pays once (threads, the allocator's arenas) is paid; then
CLIENTS more. Once every command is blocked on its full output and the
daemon's memory has settled, the growth of its anonymous memory
(/proc/PID/smaps_rollup: Anonymous, which is the heap and the threads'
stacks) and of its RSS, divided by CLIENTS, is the cost of one slow reader.
What waits in the kernel's socket and pipe buffers is not in it: that is
where a slow reader's data should wait, holding its command back.

No root needed. Results go to bench/results/heap.md (with --write).
"""
import argparse
import os
import platform
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WARM = 10
KIB = 1024

# name: (extra service lines, the producer's mode, what the client speaks)
ROWS = {
    "socketpair": ("", "bulk", "raw"),
    "copy": ('transfer = "copy"\n', "bulk", "raw"),
    "splice": ('transfer = "splice"\n', "bulk", "raw"),
    "tls": ("{tls}", "bulk", "tls"),
    "websocket-text": ('protocol = "websocket"\nstdin = "null"\n', "lines", "ws"),
    "websocket-binary": ('protocol = "websocket"\nmessages = "binary"\ntransfer = "socketpair"\n'
                         'stdin = "null"\n', "bulk", "ws"),
    "websocket-binary-splice": ('protocol = "websocket"\nmessages = "binary"\nstdin = "null"\n',
                                "bulk", "ws"),
}
TITLES = {
    "socketpair": "raw, `socketpair` (the default)",
    "copy": "raw, `copy`",
    "splice": "raw, `splice`",
    "tls": "TLS in the daemon (rustls), `socketpair`",
    "websocket-text": "WebSocket text, `socketpair`",
    "websocket-binary": "WebSocket binary, `socketpair`",
    "websocket-binary-splice": "WebSocket binary, `splice` (its default)",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_kib(pid):
    """Anonymous and Rss of `pid`, in KiB, from smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Anonymous", "Rss"):
            out[key] = int(rest.split()[0])
    return out


def children(pid):
    """The daemon's commands: its children (the launcher threads' too)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += len((task / "children").read_text().split())
        except OSError:
            pass
    return total


def blocked(pid):
    """How many of the daemon's commands sleep on a full stdout."""
    n = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                state = Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                wchan = Path(f"/proc/{kid}/wchan").read_text()
            except OSError:
                continue
            if state == "S" and wchan in ("pipe_write", "anon_pipe_write", "sock_alloc_send_pskb",
                                         "pipe_wait_writable", "unix_stream_sendmsg"):
                n += 1
    return n


def open_client(port, speaks, tls_context):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if speaks == "tls":
        s = tls_context.wrap_socket(s, server_hostname="localhost")
    elif speaks == "ws":
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            # One byte at a time: nothing of the frames behind the head is read.
            b = s.recv(1)
            if not b:
                raise RuntimeError("the upgrade was refused")
            head += b
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head.decode(errors="replace").splitlines()[0])
    return s


def settle(pid, want, patience=30):
    """Waits until `want` commands are blocked on their full output and the
    daemon's anonymous memory has not moved for a second; its memory then."""
    deadline = time.monotonic() + patience
    while blocked(pid) < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{blocked(pid)} of {want} commands blocked after {patience} s")
        time.sleep(0.1)
    last = memory_kib(pid)
    while True:
        time.sleep(1)
        now = memory_kib(pid)
        if abs(now["Anonymous"] - last["Anonymous"]) <= 64 or time.monotonic() > deadline:
            return now
        last = now


def measure(row, clients, relay, producer, tmp, tls_files):
    extra, mode, speaks = ROWS[row]
    extra = extra.replace("{tls}", f'tls_certificate = "{tls_files[0]}"\ntls_key = "{tls_files[1]}"\n')
    port = free_port()
    command = [str(producer), "bulk", str(1 << 40)] if mode == "bulk" else [str(producer), "lines"]
    cfg = tmp / f"{row}.toml"
    cfg.write_text(
        'log_level = "warn"\nmax_connections = 4096\n\n[[service]]\nname = "heap"\n'
        f'listen = "127.0.0.1:{port}"\ncommand = {json_list(command)}\n'
        f"max_connections = 4096\n{extra}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_", "JOURNAL_"))}
    log = open(tmp / f"{row}.log", "w")
    daemon = subprocess.Popen([str(relay), "--config", str(cfg)], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    held = []
    try:
        deadline = time.monotonic() + 10
        while not listening(port):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: {(tmp / f'{row}.log').read_text()}")
            time.sleep(0.02)
        for _ in range(WARM):
            held.append(open_client(port, speaks, ctx))
        before = settle(daemon.pid, WARM)
        for _ in range(clients):
            held.append(open_client(port, speaks, ctx))
        after = settle(daemon.pid, WARM + clients)
        return {k: (after[k] - before[k]) / clients for k in ("Anonymous", "Rss")}
    finally:
        for s in held:
            s.close()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def json_list(items):
    return "[" + ", ".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items) + "]"


def listening(port):
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == want and f[3] == "0A":
            return True
    return False


def certificate(tmp):
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-addext", "basicConstraints=CA:FALSE"],
                   check=True, capture_output=True)
    return cert, key


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--only", help="rows: " + ",".join(ROWS))
    ap.add_argument("--bin-dir", type=Path, help="a build's directory (default: target/release, built now)")
    ap.add_argument("--baseline", type=Path, help="another build's splice-relay binary, measured beside "
                    "this one's, row by row")
    ap.add_argument("--label", default="this build", help="this build's column in the report")
    ap.add_argument("--baseline-label", default="baseline", help="the baseline's column in the report")
    ap.add_argument("--write", action="store_true", help="write bench/results/heap.md")
    args = ap.parse_args()
    bins = args.bin_dir.resolve() if args.bin_dir else None
    if bins is None:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "splice-relay",
                        "--example", "bench-producer"], cwd=ROOT, check=True)
        bins = ROOT / "target" / "release"
    rows = args.only.split(",") if args.only else list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"heap: unknown rows {unknown}; known: {', '.join(ROWS)}")
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    builds = {args.label: bins / "splice-relay"}
    if args.baseline:
        builds = {args.baseline_label: args.baseline.resolve(), **builds}
    producer = bins / "examples" / "bench-producer"
    results = {}
    with tempfile.TemporaryDirectory(prefix="splice-relay-heap.") as d:
        tmp = Path(d)
        tls_files = certificate(tmp)
        for row in rows:
            for build, relay in builds.items():
                r = measure(row, args.clients, relay, producer, tmp, tls_files)
                results.setdefault(row, {})[build] = r
                print(f"{row:24} {build:16} anonymous {r['Anonymous']:8.1f} KiB/client   "
                      f"RSS {r['Rss']:8.1f} KiB/client", flush=True)
    report = markdown(results, args.clients)
    print("\n" + report)
    if args.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "heap.md").write_text(report + "\n")


def markdown(results, clients):
    builds = list(next(iter(results.values())))
    out = ["# The daemon's memory per slow reader", "",
           f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} vCPUs, Linux {platform.release()}; "
           f"{WARM} + {clients} clients that read nothing, each on a command that writes without end "
           "(`bench/heap.py`). The growth of the daemon's "
           f"anonymous memory (heap and stacks; its RSS grew the same) from the first {WARM} clients "
           "to all, per client, in KiB. What waits in the kernel's socket and pipe buffers is not "
           "counted: that is where a slow reader's data should wait.", "",
           "| service | " + " | ".join(builds) + " |", "|---" * (len(builds) + 1) + "|"]
    for row, by in results.items():
        out.append(f"| {TITLES[row]} | " + " | ".join(f"{by[b]['Anonymous']:.0f}" for b in builds) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
