#!/usr/bin/env python3
"""splice-relay against the tools people would use instead, side by side.

    sudo bench/run.py                 # the full suite (several minutes)
    sudo bench/run.py --smoke         # seconds: one scenario a protocol; checks the bytes
    sudo bench/run.py --only bulk,rate --rounds 3
    sudo bench/run.py --only bulk --baseline /tmp/old/splice-relay   # a change, before and after

Each scenario starts every contender (each on its own 127.0.0.1 port, in its
own cgroup), then runs rounds interleaved (A B C A B C ...), and reports the
median, min and max of each measure and the ratio of medians to the
scenario's reference. Ratios from one run are the result: the machines are
shared and noisy, single absolute numbers are not. Results go to
bench/results/latest.md (and .json, and latest.png, a panel a scenario
drawn from the same results, when matplotlib is there); `--results NAME`
writes bench/results/NAME.md, .json and .png instead (a run of some
scenarios, kept beside the full suite's); `--chart NAME` only draws
NAME.png again from NAME.json.

Root is needed for the cgroups that separate a relay's CPU time from its
command's, and to install the contenders from Debian's packages.
"""
import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RELEASE = ROOT / "target" / "release"
RELAY = RELEASE / "splice-relay"
PRODUCER = RELEASE / "examples" / "bench-producer"
LOAD = RELEASE / "examples" / "bench-load"
# The floor (bench/floor.c), built by `cc` at the start of a run.
FLOOR = RELEASE / "bench-floor"
CGROOT = Path("/sys/fs/cgroup/unified/splice-relay-bench")
# What --smoke runs (unless --only names others): one scenario a protocol,
# raw, WebSocket, TLS and a shared command, every contender of each.
SMOKE = ("bulk", "ws-text", "tls-bulk", "fanout-stall", "http-bulk")
GIB = 1 << 30
# --baseline: another build's splice-relay, run beside this one's.
BASELINE = None


# --- contenders ----------------------------------------------------------------


class Contender:
    """A server that runs the producer for each connection on 127.0.0.1:port."""

    # The scenarios it takes part in (None: all).
    scenarios = None
    # Whether its clients speak WebSocket, TLS or HTTP (and the path they ask for).
    ws = False
    tls = False
    http = False
    path = "/"

    def __init__(self, name, kind):
        self.name, self.kind = name, kind
        self.proc = None
        self.cgroup = CGROOT / name.replace(" ", "_").replace("/", "_")

    def argv(self, port, command, tmp):
        raise NotImplementedError

    def start(self, port, command, tmp):
        self.port = port
        self.cgroup.mkdir(parents=True, exist_ok=True)
        procs = self.cgroup / "cgroup.procs"
        argv, env = self.argv(port, command, tmp)

        def enter_cgroup():
            procs.write_text(str(os.getpid()))

        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(tmp / f"{self.cgroup.name}.log", "w"), preexec_fn=enter_cgroup)
        deadline = time.monotonic() + 10
        while not listening(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not start; see {tmp}/{self.cgroup.name}.log")
            time.sleep(0.02)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Whatever is left in the cgroup (forked relays, commands).
        kill = self.cgroup / "cgroup.kill"
        if kill.exists():
            kill.write_text("1")

    def cpu_seconds(self):
        for line in (self.cgroup / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec"):
                return int(line.split()[1]) / 1e6
        return 0.0

    def rss_bytes(self):
        total = 0
        for pid in (self.cgroup / "cgroup.procs").read_text().split():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total


class SpliceRelay(Contender):
    """`transfer` None: the default path (the config does not say)."""

    def __init__(self, transfer=None, cgroups=False, binary=None, tag=""):
        name = "splice-relay" + (f" {transfer}" if transfer else "")
        super().__init__(name + (" cgroups" if cgroups else "") + tag, "relay")
        self.transfer = transfer
        self.cgroups = cgroups
        self.binary = binary or RELAY
        self.extra = ""
        # The cgroup per connection is measured where its cost shows: the rate.
        if cgroups:
            self.scenarios = {"rate1", "rate32"}

    def start(self, port, command, tmp):
        # Its own cgroup, marked as systemd marks a delegated one: the daemon
        # moves into daemon/ there and runs each command in a slot-N cgroup.
        self.cgroup.mkdir(parents=True, exist_ok=True)
        if self.cgroups:
            os.setxattr(self.cgroup, "user.delegate", b"1")
        super().start(port, command, tmp)

    def argv(self, port, command, tmp):
        cfg = tmp / f"{self.cgroup.name}.toml"
        cfg.write_text(
            'log_level = "warn"\nmax_connections = 4096\n\n[[service]]\nname = "bench"\n'
            f'listen = "127.0.0.1:{port}"\ncommand = {json.dumps(command)}\n'
            + (f'transfer = "{self.transfer}"\n' if self.transfer else "")
            + 'max_connections = 4096\n' + self.extra)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_", "JOURNAL_"))}
        return [str(self.binary), "--config", str(cfg)], env


class Floor(Contender):
    """The floor (bench/floor.c): one thread, epoll, one read(2) a line
    and one write(2) per client; a command per connection on a socket pair
    ("relay"), or one command for every client ("shared"); or, for the
    connection rate, accept(2) and posix_spawn(3) alone ("spawn")."""

    def __init__(self, mode):
        super().__init__(f"floor {mode} (C)", "relay")
        self.mode = mode
        self.scenarios = {"relay": {"slow"}, "shared": {"shared-slow"}, "spawn": {"rate1", "rate32"}}[mode]

    def argv(self, port, command, tmp):
        return [str(FLOOR), self.mode, str(port), *command], None


def build_floor():
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(FLOOR), str(ROOT / "bench" / "floor.c")], check=True)


SHARED_SCENARIOS = {"fanout1", "fanout10", "fanout100", "fanout-stall", "shared-slow"}


class SpliceRelayShared(SpliceRelay):
    """One shared command for every client: fanned out by tee(2) (the
    default), or by a copy (`transfer = "copy"`)."""

    def __init__(self, transfer=None, lagging="drop"):
        super().__init__(transfer)
        way = {None: "", "copy": " copy"}[transfer]
        self.name = "splice-relay shared" + way + (" wait" if lagging == "wait" else "")
        self.cgroup = CGROOT / self.name.replace(" ", "_")
        self.extra = f'shared = true\nlinger = "never"\nlagging = "{lagging}"\n'
        self.scenarios = SHARED_SCENARIOS


WS_SCENARIOS = {"ws-rate1", "ws-rate32", "ws-text", "ws-bulk", "ws-bulk4", "ws-slow"}
# One bulk stream to many WebSocket readers: a shared command, a command
# each (splice-relay's and websocketd's), and the broadcasters people use.
WS_FANOUT = {"ws-fanout1", "ws-fanout10", "ws-fanout100"}


class SpliceRelayWs(SpliceRelay):
    """A WebSocket service: text messages, or binary ones (spliced from the pipe)."""

    def __init__(self, messages="text", binary=None, tag=""):
        super().__init__(binary=binary)
        self.name = "splice-relay websocket" + (" binary" if messages == "binary" else "") + tag
        self.cgroup = CGROOT / self.name.replace(" ", "_")
        self.extra = f'protocol = "websocket"\nmessages = "{messages}"\n'
        self.ws = True
        self.scenarios = WS_SCENARIOS | (WS_FANOUT if messages == "binary" and not tag else set())


class SpliceRelayWsShared(SpliceRelay):
    """A shared command's binary WebSocket clients, each sent every byte
    (`lagging = "wait"`, as the raw fan-out rows)."""

    def __init__(self):
        super().__init__()
        self.name = "splice-relay websocket shared wait"
        self.cgroup = CGROOT / self.name.replace(" ", "_")
        self.extra = ('protocol = "websocket"\nmessages = "binary"\nshared = true\nlinger = "never"\n'
                      'lagging = "wait"\n')
        self.ws = True
        self.scenarios = WS_FANOUT


class WebsocatBroadcast(Contender):
    """websocat's `broadcast:` overlay: one command (`exec:`) for every
    client, its output sent to each as binary messages."""

    def __init__(self):
        super().__init__("websocat broadcast", "relay")
        self.ws = True
        self.scenarios = WS_FANOUT

    def argv(self, port, command, tmp):
        return ["websocat", "-q", "-b", "-E", f"ws-l:127.0.0.1:{port}", "broadcast:exec:" + command[0],
                "--exec-args", *command[1:]], None


class Wsbroad(Contender):
    """wsbroad, a WebSocket broadcast server: what one client sends, the
    others on its path get. The command's output goes in through a websocat
    client (`-u`, one way), which counts as part of the relay."""

    def __init__(self):
        super().__init__("wsbroad", "relay")
        self.ws = True
        self.scenarios = WS_FANOUT
        self.publisher = None

    def argv(self, port, command, tmp):
        return ["wsbroad", f"127.0.0.1:{port}"], None

    def start(self, port, command, tmp):
        super().start(port, command, tmp)
        procs = self.cgroup / "cgroup.procs"
        pipeline = " ".join(map(shlex.quote, command)) + f" | websocat -q -b -u ws://127.0.0.1:{port}/"
        self.publisher = subprocess.Popen(
            ["sh", "-c", pipeline], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(tmp / "wsbroad-publisher.log", "w"),
            preexec_fn=lambda: procs.write_text(str(os.getpid())))

    def stop(self):
        if self.publisher and self.publisher.poll() is None:
            self.publisher.kill()
            self.publisher.wait()
        super().stop()


HTTP_SCENARIOS = {"http-rate1", "http-rate32", "http-bulk"}


class SpliceRelayHttp(SpliceRelay):
    """An HTTP service: the command's output is the response's body."""

    def __init__(self, binary=None, tag=""):
        super().__init__(binary=binary)
        self.name = "splice-relay http" + tag
        self.cgroup = CGROOT / self.name.replace(" ", "_")
        self.extra = 'protocol = "http"\n'
        self.http = True
        self.scenarios = HTTP_SCENARIOS


def cgi_program(root, command):
    """The producer as a CGI program at root/run: its arguments beside it in
    run.args (bench/producer.rs reads them, and writes a CGI header)."""
    root.mkdir(exist_ok=True)
    program = root / "run"
    if program.is_symlink() or program.exists():
        program.unlink()
    program.symlink_to(command[0])
    (root / "run.args").write_text(" ".join(command[1:]))
    return program


class Lighttpd(Contender):
    """lighttpd with mod_cgi, the response streamed as it comes."""

    def __init__(self):
        super().__init__("lighttpd mod_cgi", "relay")
        self.http, self.path = True, "/run"
        self.scenarios = HTTP_SCENARIOS

    def argv(self, port, command, tmp):
        root = tmp / "lighttpd"
        cgi_program(root, command)
        conf = tmp / "lighttpd.conf"
        conf.write_text(
            f'server.document-root = "{root}"\nserver.bind = "127.0.0.1"\nserver.port = {port}\n'
            'server.modules = ("mod_cgi")\ncgi.assign = ("" => "")\nserver.stream-response-body = 2\n'
            f'server.max-connections = 4096\nserver.errorlog = "{tmp}/lighttpd-error.log"\n')
        return ["lighttpd", "-D", "-f", str(conf)], None


class NginxFcgiwrap(Contender):
    """nginx with fcgiwrap (32 workers, one request each at a time), the
    response unbuffered."""

    def __init__(self):
        super().__init__("nginx fcgiwrap", "relay")
        self.http, self.path = True, "/run"
        self.scenarios = HTTP_SCENARIOS
        self.wrapper = None

    def start(self, port, command, tmp):
        self.cgroup.mkdir(parents=True, exist_ok=True)
        procs = self.cgroup / "cgroup.procs"
        self.socket = tmp / "fcgiwrap.sock"
        if self.socket.exists():
            self.socket.unlink()
        self.wrapper = subprocess.Popen(
            ["fcgiwrap", "-c", "32", "-s", f"unix:{self.socket}"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(tmp / "fcgiwrap.log", "w"),
            preexec_fn=lambda: procs.write_text(str(os.getpid())))
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.wrapper.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fcgiwrap did not start; see {tmp}/fcgiwrap.log")
            time.sleep(0.02)
        super().start(port, command, tmp)

    def argv(self, port, command, tmp):
        program = cgi_program(tmp / "fcgi", command)
        conf = tmp / "nginx-fcgiwrap.conf"
        conf.write_text(
            f"daemon off;\nuser root;\nworker_processes auto;\nerror_log {tmp}/nginx-error.log warn;\npid {tmp}/nginx.pid;\n"
            "events { worker_connections 4096; }\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {tmp};\n  fastcgi_temp_path {tmp};\n"
            f"  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n"
            f"      fastcgi_pass unix:{self.socket};\n      fastcgi_buffering off;\n"
            f"      fastcgi_param SCRIPT_FILENAME {program};\n      fastcgi_param GATEWAY_INTERFACE CGI/1.1;\n"
            "      fastcgi_param REQUEST_METHOD $request_method;\n      fastcgi_param QUERY_STRING $query_string;\n"
            "    }\n  }\n}\n")
        return ["nginx", "-c", str(conf), "-p", str(tmp)], None

    def stop(self):
        super().stop()
        if self.wrapper and self.wrapper.poll() is None:
            self.wrapper.kill()
            self.wrapper.wait()


class Webhook(Contender):
    """adnanh/webhook (Debian's webhook): a hook that runs the command and
    answers with its output (it buffers the output: it cannot stream it)."""

    def __init__(self):
        super().__init__("webhook", "relay")
        self.http, self.path = True, "/hooks/run"
        self.scenarios = HTTP_SCENARIOS

    def argv(self, port, command, tmp):
        hooks = tmp / "hooks.json"
        hooks.write_text(json.dumps([{
            "id": "run", "execute-command": command[0],
            "pass-arguments-to-command": [{"source": "string", "name": a} for a in command[1:]],
            "include-command-output-in-response": True}]))
        return ["webhook", "-hooks", str(hooks), "-ip", "127.0.0.1", "-port", str(port)], None


TLS_SCENARIOS = {"tls-rate1", "tls-rate32", "tls-bulk", "tls-bulk4"}
# The certificate every TLS contender serves (made by main()).
TLS_FILES = {}


class SpliceRelayTls(SpliceRelay):
    def __init__(self, transfer=None, binary=None, tag=""):
        super().__init__(transfer, binary=binary)
        self.name = "splice-relay tls" + (f" {transfer}" if transfer else "") + tag
        self.cgroup = CGROOT / self.name.replace(" ", "_")
        self.extra = f'tls_certificate = "{TLS_FILES["cert"]}"\ntls_key = "{TLS_FILES["key"]}"\n'
        self.tls = True
        self.scenarios = TLS_SCENARIOS


class Stunnel(Contender):
    def __init__(self):
        super().__init__("stunnel", "relay")
        self.tls = True
        self.scenarios = TLS_SCENARIOS

    def argv(self, port, command, tmp):
        conf = tmp / "stunnel.conf"
        conf.write_text(f"""foreground = yes
pid =
debug = 3
[bench]
accept = 127.0.0.1:{port}
cert = {TLS_FILES["cert"]}
key = {TLS_FILES["key"]}
exec = {command[0]}
execArgs = {" ".join(command)}
""")
        return ["stunnel4", str(conf)], None


class SocatTls(Contender):
    def __init__(self, buffer=None):
        super().__init__("socat openssl" + (f" -b{buffer}" if buffer else ""), "relay")
        self.buffer = buffer
        self.tls = True
        self.scenarios = TLS_SCENARIOS

    def argv(self, port, command, tmp):
        b = ["-b", str(self.buffer)] if self.buffer else []
        return ["socat", *b, f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,"
                f"cert={TLS_FILES['cert']},key={TLS_FILES['key']},verify=0",
                "EXEC:" + " ".join(command)], None


class Websocketd(Contender):
    def __init__(self, binary=False):
        super().__init__("websocketd" + (" --binary" if binary else ""), "relay")
        self.binary = binary
        self.ws = True
        self.scenarios = WS_SCENARIOS | (WS_FANOUT if binary else set())

    def argv(self, port, command, tmp):
        binary = ["--binary"] if self.binary else []
        return ["websocketd", f"--port={port}", "--address=127.0.0.1", "--loglevel=error", *binary,
                *command], None


class Socat(Contender):
    def __init__(self, buffer=None):
        super().__init__("socat" + (f" -b{buffer}" if buffer else ""), "relay")
        self.buffer = buffer

    def argv(self, port, command, tmp):
        b = ["-b", str(self.buffer)] if self.buffer else []
        return ["socat", *b, f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
                "EXEC:" + " ".join(command)], None


class TcpServer(Contender):
    def __init__(self):
        super().__init__("tcpserver", "direct")

    def argv(self, port, command, tmp):
        # -c: at most 2000 at once (default 40); -b: backlog (default 20);
        # -R -H: no ident or DNS lookups.
        # -l 0: no lookup of the local host name (on a closed network it
        # times out on every connection).
        return ["tcpserver", "-q", "-R", "-H", "-l", "0", "-c", "2000", "-b", "1024",
                "127.0.0.1", str(port), *command], None


class Xinetd(Contender):
    def __init__(self):
        super().__init__("xinetd", "direct")

    def argv(self, port, command, tmp):
        conf = tmp / "xinetd.conf"
        conf.write_text(f"""defaults
{{
    instances = UNLIMITED
    per_source = UNLIMITED
    cps = 1000000 1
    log_type = FILE {tmp}/xinetd.log
    log_on_success =
    log_on_failure =
}}
service splice-relay-bench
{{
    type = UNLISTED
    socket_type = stream
    protocol = tcp
    wait = no
    user = root
    bind = 127.0.0.1
    port = {port}
    server = {command[0]}
    server_args = {" ".join(command[1:])}
}}
""")
        return ["xinetd", "-dontfork", "-f", str(conf), "-pidfile", str(tmp / "xinetd.pid")], None


class Direct(Contender):
    """systemd-socket-activate --inetd: the socket is the command's stdout."""

    def __init__(self):
        super().__init__("direct", "direct")

    def argv(self, port, command, tmp):
        return ["systemd-socket-activate", "--inetd", "-a", "-l", f"127.0.0.1:{port}", *command], None


def listening(port):
    """Whether something listens on 127.0.0.1:port (read from /proc: no probe connection)."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":
            return True
    return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- measuring --------------------------------------------------------------------


def wire(c):
    """The prefix of bench-load's modes for what the contender's clients speak."""
    return "ws" if c.ws else "tls" if c.tls else "http" if c.http else ""


def load(*args, timeout=600):
    out = subprocess.run([str(LOAD), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"bench-load {' '.join(map(str, args))}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def producer(*args):
    return [str(PRODUCER), "--cgroup", str(CGROOT / "commands"), *map(str, args)]


def bulk_bytes(smoke, clients):
    """Per client: a run of a few seconds on these machines."""
    if smoke:
        return 16 << 20
    return 4 * GIB if clients == 1 else GIB


def scenario_bulk(c, smoke, clients, per=None):
    per = per or bulk_bytes(smoke, clients)
    cpu0 = c.cpu_seconds()
    r = load(wire(c) + "bulk", f"127.0.0.1:{c.port}", clients, per, *([c.path] if c.http else []))
    cpu = c.cpu_seconds() - cpu0
    if not r["ok"]:
        raise RuntimeError(f"{c.name}: bulk delivered {r['bytes']} bytes, not {clients * per}")
    return {"GB/s": r["gbps"], "relay CPU s/GiB": cpu / (r["bytes"] / GIB)}


def scenario_rate(c, smoke, concurrency):
    r = load(wire(c) + "rate", f"127.0.0.1:{c.port}", concurrency, 1 if smoke else 5,
             *([c.path] if c.http else []))
    if smoke and r["ok"] == 0:
        raise RuntimeError(f"{c.name}: no connection served")
    return {"conn/s": r["per_sec"], "failed": r["failed"]}


def commands_cpu_seconds():
    return cgroup_cpu_seconds(CGROOT / "commands")


def cgroup_cpu_seconds(cgroup):
    for line in (cgroup / "cpu.stat").read_text().splitlines():
        if line.startswith("usage_usec"):
            return int(line.split()[1]) / 1e6
    return 0.0


def scenario_slow(c, smoke, clients, window):
    """The server's own CPU, and the whole cost of a line (server and
    commands together: a relay's commands write to a pipe, a direct one's to
    TCP), each line being one tick of one command."""
    warmup = 0 if smoke else 2
    mode = "wsslow" if c.ws else "slow"
    p = subprocess.Popen([str(LOAD), mode, f"127.0.0.1:{c.port}", str(clients), str(window), str(warmup)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stderr.readline().strip() == "connected", f"{c.name}: slow clients did not connect"
    time.sleep(warmup)  # the server may still be starting commands; then measure a whole window
    cpu0, cmd0, t0 = c.cpu_seconds(), commands_cpu_seconds(), time.monotonic()
    time.sleep(window / 2)
    rss = c.rss_bytes()
    time.sleep(window / 2)
    secs = time.monotonic() - t0
    own = c.cpu_seconds() - cpu0
    whole = own + commands_cpu_seconds() - cmd0
    out, err = p.communicate(timeout=120)
    r = json.loads(out)
    if r["served"] != clients:
        raise RuntimeError(f"{c.name}: {r['served']}/{clients} slow clients served: {err}")
    lines = clients * secs  # one a second each
    return {"RSS MiB": rss / (1 << 20), "CPU %": own / secs * 100, "p50 ms": r["p50_ms"],
            "p99 ms": r["p99_ms"], "server µs/line": own / lines * 1e6, "whole µs/line": whole / lines * 1e6}


def scenario_burst(c, smoke, streams, burst, window):
    """Streams tick while a burst of new connections arrives: their line
    delay during the burst, and how fast the burst is served."""
    r = load("burst", f"127.0.0.1:{c.port}", streams, burst, window, timeout=300)
    if r["served"] != burst:
        raise RuntimeError(f"{c.name}: {r['served']}/{burst} burst clients served")
    return {"during p99 ms": r["during_p99_ms"], "during max ms": r["during_max_ms"],
            "before p99 ms": r["before_p99_ms"], "burst conn/s": r["burst_per_sec"]}


def scenario_fanout(c, smoke, clients, stalled=0):
    """Readers of one endless bulk stream: the bytes a second delivered to
    all of them, and the relay's CPU per GiB delivered."""
    secs = 1 if smoke else 4
    cpu0 = c.cpu_seconds()
    r = load(wire(c) + "fanout", f"127.0.0.1:{c.port}", clients, secs, stalled)
    cpu = c.cpu_seconds() - cpu0
    if not r["ok"]:
        raise RuntimeError(f"{c.name}: a reader got nothing")
    return {"GB/s": r["gbps"], "relay CPU s/GiB": cpu / (r["bytes"] / GIB),
            "slowest reader GB/s": r["slowest_gbps"]}


def scenario_stall(c, smoke):
    """Ten readers, then nine readers and one client that never reads, back
    to back: the readers' bytes a second each time, and the relay's RSS
    with the stalled client."""
    secs = 1 if smoke else 4
    ten = load("fanout", f"127.0.0.1:{c.port}", 10, secs, 0)
    p = subprocess.Popen([str(LOAD), "fanout", f"127.0.0.1:{c.port}", "9", str(secs), "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(secs / 2 + 1)
    rss = c.rss_bytes()
    out, err = p.communicate(timeout=120)
    nine = json.loads(out)
    per_ten, per_nine = ten["gbps"] / 10, nine["gbps"] / 9
    return {"reader GB/s, 9 + 1 stalled": per_nine, "reader GB/s, 10": per_ten,
            "9 + 1 / 10": per_nine / per_ten, "RSS MiB, stalled": rss / (1 << 20)}


def scenario_text(c, smoke):
    """Text messages a second on one connection from a producer of short lines."""
    cpu0 = c.cpu_seconds()
    r = load("wstext", f"127.0.0.1:{c.port}", 1 if smoke else 5)
    cpu = c.cpu_seconds() - cpu0
    if r["messages"] == 0:
        raise RuntimeError(f"{c.name}: no message")
    return {"messages/s": r["per_sec"], "relay CPU µs/message": cpu / r["messages"] * 1e6}


def scenario_latency(c, smoke):
    t = load("ttfb", f"127.0.0.1:{c.port}", 5 if smoke else 200)
    return {"TTFB p50 ms": t["p50_ms"], "TTFB p99 ms": t["p99_ms"]}


def scenario_lines(c, smoke):
    r = load("slow", f"127.0.0.1:{c.port}", 1, 1 if smoke else 3)
    return {"line p50 ms": r["p50_ms"], "line p99 ms": r["p99_ms"]}


# --- the suite -------------------------------------------------------------------------


def contenders(names, scenario):
    all_ = [Direct(), SpliceRelay(), SpliceRelay(cgroups=True), SpliceRelay("splice"), SpliceRelay("copy"),
            SpliceRelay("direct"), Socat(), Socat(1 << 20), TcpServer(), Xinetd(),
            SpliceRelayWs(), SpliceRelayWs("binary"), Websocketd(), Websocketd(binary=True),
            SpliceRelayTls(), SpliceRelayTls("direct"), Stunnel(), SocatTls(), SocatTls(1 << 20),
            SpliceRelayShared(), SpliceRelayShared("copy"),
            SpliceRelayShared(lagging="wait"), SpliceRelayShared("copy", lagging="wait"),
            SpliceRelayWsShared(), Floor("relay"), Floor("shared"), Floor("spawn"),
            SpliceRelayHttp(), Lighttpd(), NginxFcgiwrap(), Webhook()]
    # The Rust broadcasters, where installed (ensure_tools installs them).
    all_ += [c for c, exe in ((WebsocatBroadcast(), "websocat"), (Wsbroad(), "wsbroad")) if shutil.which(exe)]
    if BASELINE:
        # Another build's relayed rows, beside this one's in the same run.
        all_ += [SpliceRelay(t, binary=BASELINE, tag=" baseline") for t in (None, "splice", "copy")]
        all_ += [SpliceRelayWs(m, binary=BASELINE, tag=" baseline") for m in ("text", "binary")]
        all_ += [SpliceRelayTls(binary=BASELINE, tag=" baseline")]
        all_ += [SpliceRelayHttp(binary=BASELINE, tag=" baseline")]
    return [c for c in all_ if (names is None or c.name in names)
            and (c.scenarios is None or scenario in c.scenarios)]


def run_scenario(title, reference, command_args, measure, picks, rounds, tmp, smoke):
    print(f"\n## {title}", flush=True)
    started = []
    try:
        for c in picks:
            c.start(free_port(), producer(*command_args), tmp)
            started.append(c)
        samples = {c.name: [] for c in picks}
        errors = {}
        for r in range(rounds):
            for c in picks:
                if c.name in errors:
                    continue
                try:
                    m = measure(c)
                except (RuntimeError, AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                    # A contender that fails a scenario is reported as failing
                    # it; the others go on.
                    errors[c.name] = str(e).splitlines()[0][:160]
                    print(f"  round {r + 1} {c.name:22} FAILED: {errors[c.name]}", flush=True)
                    if smoke:
                        raise
                    continue
                samples[c.name].append(m)
                print(f"  round {r + 1} {c.name:22} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()), flush=True)
    finally:
        for c in started:
            c.stop()
    return {"title": title, "reference": reference, "samples": samples, "errors": errors}


def summarize(result):
    ref = result["reference"]
    samples = {n: ms for n, ms in result["samples"].items() if ms}
    if not samples:
        return [], []
    keys = list(next(iter(samples.values()))[0].keys())
    rows = []
    for name, ms in samples.items():
        row = {"contender": name}
        for k in keys:
            vals = [m[k] for m in ms]
            row[k] = (statistics.median(vals), min(vals), max(vals))
        rows.append(row)
    main = keys[0]
    refmed = next((r[main][0] for r in rows if r["contender"] == ref), None)
    for r in rows:
        r["ratio"] = r[main][0] / refmed if refmed else float("nan")
    return keys, rows


def markdown(results, machine, rounds):
    out = ["# splice-relay benchmark results", "",
           f"{machine}; {rounds} round(s) per contender, interleaved. Each cell: median (min–max). "
           "Ratio: this contender's median of the first measure over the reference's.", ""]
    for res in results:
        keys, rows = summarize(res)
        out += [f"## {res['title']}", "", f"Reference: {res['reference']}.", ""]
        if not rows:
            out += ["Every contender failed: " + "; ".join(f"{n}: {w}" for n, w in res["errors"].items()), ""]
            continue
        out.append("| contender | " + " | ".join(keys) + f" | × {res['reference']} |")
        out.append("|---" * (len(keys) + 2) + "|")
        for r in rows:
            cells = [f"{r[k][0]:.3g} ({r[k][1]:.3g}–{r[k][2]:.3g})" for k in keys]
            out.append(f"| {r['contender']} | " + " | ".join(cells) + f" | {r['ratio']:.2f} |")
        for name, why in res.get("errors", {}).items():
            out.append(f"| {name} | failed: {why} |" + " |" * len(keys))
        out.append("")
    return "\n".join(out)


def machine_line():
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} vCPUs ({cpu}), "
            f"Linux {platform.release()}, loopback")


# The Rust broadcasters, installed by cargo (minutes of building, once) when
# a scenario they take part in runs.
CRATES = (("websocat@1.14.1", "websocat"), ("wsbroad@0.3.0", "wsbroad"))


def ensure_tools(scenarios):
    need = [p for p, exe in (("socat", "socat"), ("ucspi-tcp", "tcpserver"), ("xinetd", "xinetd"),
                             ("websocketd", "websocketd"), ("stunnel4", "stunnel4"), ("openssl", "openssl"),
                             ("lighttpd", "lighttpd"), ("fcgiwrap", "fcgiwrap"), ("nginx-light", "nginx"),
                             ("webhook", "webhook"))
            if not shutil.which(exe)]
    if need:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need], check=True)
    if scenarios & WS_FANOUT:
        for crate, exe in CRATES:
            if not shutil.which(exe):
                print(f"bench: installing {crate} (cargo install; a few minutes, once)", flush=True)
                subprocess.run(["cargo", "install", "--locked", "--quiet", crate], check=True)
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "splice-relay",
                    "--example", "bench-producer", "--example", "bench-load"], cwd=ROOT, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one round, one scenario a protocol (or --only's): it runs and the bytes are right")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", help="scenarios: bulk,bulk4,vmsplice,cat,cat4,head,head4,gzip,gzip4,"
                    "rate1,rate32,slow,burst,latency,lines,ws-rate1,ws-rate32,ws-text,ws-bulk,ws-bulk4,ws-slow,"
                    "tls-rate1,tls-rate32,tls-bulk,tls-bulk4,fanout1,fanout10,fanout100,ws-fanout1,ws-fanout10,"
                    "ws-fanout100,fanout-stall,shared-slow,http-rate1,http-rate32,http-bulk")
    ap.add_argument("--contenders", help="comma-separated names (default: all)")
    ap.add_argument("--baseline", type=Path, help="another build's splice-relay binary: its rows "
                    "(`splice-relay baseline`, `splice-relay splice baseline`, `splice-relay copy baseline`, "
                    "`splice-relay websocket baseline`, `splice-relay websocket binary baseline`, "
                    "`splice-relay tls baseline`) run beside this build's, for a before and after in one run")
    ap.add_argument("--results", default="latest", help="the name of the results files (default: latest)")
    ap.add_argument("--chart", metavar="NAME", help="only draw bench/results/NAME.png from NAME.json")
    args = ap.parse_args()
    if args.chart:
        chart(json.loads((RESULTS / f"{args.chart}.json").read_text())["results"], args.chart)
        return
    global BASELINE
    BASELINE = args.baseline.resolve() if args.baseline else None
    if os.geteuid() != 0:
        sys.exit("bench: run as root (cgroups for CPU accounting; apt for the contenders)")
    only = set(args.only.split(",")) if args.only else None
    ensure_tools(only if only is not None else WS_FANOUT if not args.smoke else set(SMOKE))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rounds = 1 if args.smoke else args.rounds
    names = set(args.contenders.split(",")) if args.contenders else None
    smoke = args.smoke
    slow_clients = 5 if smoke else 1000
    window = 1 if smoke else 5
    CGROOT.mkdir(parents=True, exist_ok=True)
    (CGROOT / "commands").mkdir(exist_ok=True)

    # Real producers: cat of a page-cached file, head -c from /dev/zero,
    # gzip -1 of compressible text. The files live in the suite's temporary
    # directory; the cat file is read once first, so it is in the page cache.
    files = Path(tempfile.mkdtemp(prefix="splice-relay-bench-files."))
    cat_file, text_file = files / "cat.bin", files / "text.txt"
    cat_size = (8 << 20) if smoke else GIB
    with open(cat_file, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(cat_size >> 20):
            f.write(chunk)
    subprocess.run(["cat", str(cat_file)], stdout=subprocess.DEVNULL, check=True)
    with open(text_file, "w") as f:
        subprocess.run(["seq", "1", str(300_000 if smoke else 20_000_000)], stdout=f, check=True)
    gzip_size = len(subprocess.run(["gzip", "-1", "-c", str(text_file)], capture_output=True, check=True).stdout)
    real = ("direct", "splice-relay", "splice-relay splice", "socat -b1048576")
    text_ws = ("splice-relay websocket", "websocketd")
    binary_ws = ("splice-relay splice", "splice-relay websocket binary", "websocketd --binary")
    ws_bulk = GIB // 4 if not smoke else 16 << 20
    http_bulk = GIB // 4 if not smoke else 16 << 20
    http_who = ("splice-relay http", "lighttpd mod_cgi", "nginx fcgiwrap", "webhook")
    tls_bulk = GIB if not smoke else 16 << 20
    tls_who = ("splice-relay tls", "splice-relay tls direct", "stunnel", "socat openssl",
               "socat openssl -b1048576")
    if BASELINE:
        def with_baseline(names):
            return names + tuple(f"{n} baseline" for n in names if n.startswith("splice-relay"))
        real, text_ws, binary_ws, tls_who = map(with_baseline, (real, text_ws, binary_ws, tls_who))
        http_who = with_baseline(http_who)
    make_certificate(files)
    build_floor()
    # A bulk stream outruns its readers: exact delivery (lagging = "wait")
    # paces the command by the slowest. A stalled client is dropped
    # (lagging = "drop") from a stream the others keep up with.
    shared_who = ("splice-relay", "splice-relay shared wait", "splice-relay shared copy wait")
    shared_only = ("splice-relay shared", "splice-relay shared copy")
    ws_fanout_who = ("splice-relay websocket binary", "websocketd --binary", "splice-relay websocket shared wait",
                     "websocat broadcast", "wsbroad")

    def real_bulk(key, title, argv, per, clients):
        return (key, title, "direct", ("exec", *argv), lambda c: scenario_bulk(c, smoke, clients, per), real)

    cats = 1 if smoke else 4
    plan = [
        ("bulk", "1. Bulk, one client", "direct", ("bulk", 0), lambda c: scenario_bulk(c, smoke, 1)),
        ("bulk4", "1b. Bulk, four clients at once (aggregate)", "direct", ("bulk", 0),
         lambda c: scenario_bulk(c, smoke, 4)),
        ("vmsplice", "1c. Bulk, one client, a producer that vmsplices its output", "direct",
         ("vmsplice", 0), lambda c: scenario_bulk(c, smoke, 1)),
        ("rate1", "2. Connection rate, concurrency 1 (`hello`)", "tcpserver", ("hello",),
         lambda c: scenario_rate(c, smoke, 1)),
        ("rate32", "2b. Connection rate, concurrency 32 (`hello`)", "tcpserver", ("hello",),
         lambda c: scenario_rate(c, smoke, 32)),
        ("slow", f"3. {slow_clients} slow streams (a line a second); the server's RSS and CPU",
         "direct", ("ticks", 1000, window + 5), lambda c: scenario_slow(c, smoke, slow_clients, window)),
        ("latency", "4. Time to first byte (`hello`, 200 connections in a row)", "direct", ("hello",),
         lambda c: scenario_latency(c, smoke)),
        ("lines", "4b. Line delay, a line every 50 ms", "direct", ("ticks", 50, 80 if not smoke else 5),
         lambda c: scenario_lines(c, smoke)),
        real_bulk("cat", "1d. Bulk, one client, `cat` of a page-cached file", ["cat"] + [str(cat_file)] * cats,
                  cats * cat_size, 1),
        real_bulk("cat4", "1e. Bulk, four clients, `cat` of a page-cached file", ["cat", str(cat_file)],
                  cat_size, 4),
        real_bulk("head", "1f. Bulk, one client, `head -c` from /dev/zero", ["head", "-c", str(bulk_bytes(smoke, 1)),
                  "/dev/zero"], bulk_bytes(smoke, 1), 1),
        real_bulk("head4", "1g. Bulk, four clients, `head -c` from /dev/zero", ["head", "-c", str(bulk_bytes(smoke, 4)),
                  "/dev/zero"], bulk_bytes(smoke, 4), 4),
        real_bulk("gzip", "1h. Bulk, one client, `gzip -1` of text", ["gzip", "-1", "-c", str(text_file)], gzip_size, 1),
        real_bulk("gzip4", "1i. Bulk, four clients, `gzip -1` of text", ["gzip", "-1", "-c", str(text_file)],
                  gzip_size, 4),
        ("burst", f"5. {slow_clients} streams ticking while {2 * slow_clients} more connect at once", "direct",
         ("ticks", 1000, 40 if not smoke else 10),
         lambda c: scenario_burst(c, smoke, slow_clients, 2 * slow_clients, window),
         ("direct", "splice-relay", "splice-relay splice", "splice-relay direct", "tcpserver",
          "splice-relay baseline")),
        # WebSocket: websocketd and splice-relay's WebSocket services; the
        # binary bulk rows against splice-relay's own raw splice path.
        ("ws-rate1", "6. WebSocket: connection rate, concurrency 1 (one line)", "websocketd", ("hello",),
         lambda c: scenario_rate(c, smoke, 1), text_ws),
        ("ws-rate32", "6b. WebSocket: connection rate, concurrency 32 (one line)", "websocketd", ("hello",),
         lambda c: scenario_rate(c, smoke, 32), text_ws),
        ("ws-text", "6c. WebSocket: text messages on one connection (short lines)", "websocketd", ("lines",),
         lambda c: scenario_text(c, smoke), text_ws),
        ("ws-bulk", "6d. WebSocket: binary bulk, one client", "splice-relay splice", ("bulk", 4 * ws_bulk),
         lambda c: scenario_bulk(c, smoke, 1, 4 * ws_bulk), binary_ws),
        ("ws-bulk4", "6e. WebSocket: binary bulk, four clients at once (aggregate)", "splice-relay splice",
         ("bulk", ws_bulk), lambda c: scenario_bulk(c, smoke, 4, ws_bulk), binary_ws),
        ("ws-slow", f"6f. WebSocket: {slow_clients} connections ticking once a second; the server's RSS and CPU",
         "websocketd", ("ticks", 1000, window + 5), lambda c: scenario_slow(c, smoke, slow_clients, window),
         text_ws),
        # TLS: stunnel and socat's OPENSSL-LISTEN, full handshakes, a producer of 1 MiB writes.
        ("tls-rate1", "7. TLS: handshakes a second, concurrency 1 (one line)", "stunnel", ("hello",),
         lambda c: scenario_rate(c, smoke, 1), tls_who),
        ("tls-rate32", "7b. TLS: handshakes a second, concurrency 32 (one line)", "stunnel", ("hello",),
         lambda c: scenario_rate(c, smoke, 32), tls_who),
        ("tls-bulk", "7c. TLS: bulk, one client (1 MiB writes)", "stunnel", ("bulk", tls_bulk),
         lambda c: scenario_bulk(c, smoke, 1, tls_bulk), tls_who),
        ("tls-bulk4", "7d. TLS: bulk, four clients at once (aggregate)", "stunnel", ("bulk", tls_bulk // 2),
         lambda c: scenario_bulk(c, smoke, 4, tls_bulk // 2), tls_who),
        # Shared commands: one endless bulk stream to 1, 10 and 100 readers,
        # against a command per reader (the only way without `shared`).
        ("fanout1", "8. Shared command: one bulk stream to 1 reader", "splice-relay", ("bulk", 1 << 50),
         lambda c: scenario_fanout(c, smoke, 1), shared_who),
        ("fanout10", "8b. Shared command: one bulk stream to 10 readers (aggregate)", "splice-relay",
         ("bulk", 1 << 50), lambda c: scenario_fanout(c, smoke, 10), shared_who),
        ("fanout100", "8c. Shared command: one bulk stream to 100 readers (aggregate)", "splice-relay",
         ("bulk", 1 << 50), lambda c: scenario_fanout(c, smoke, 100 if not smoke else 20), shared_who),
        ("ws-fanout1", "8f. WebSocket: one bulk stream to 1 binary reader", "splice-relay websocket binary",
         ("bulk", 1 << 50), lambda c: scenario_fanout(c, smoke, 1), ws_fanout_who),
        ("ws-fanout10", "8g. WebSocket: one bulk stream to 10 binary readers (aggregate)",
         "splice-relay websocket binary", ("bulk", 1 << 50), lambda c: scenario_fanout(c, smoke, 10), ws_fanout_who),
        ("ws-fanout100", "8h. WebSocket: one bulk stream to 100 binary readers (aggregate)",
         "splice-relay websocket binary", ("bulk", 1 << 50),
         lambda c: scenario_fanout(c, smoke, 100 if not smoke else 20), ws_fanout_who),
        ("fanout-stall", "8d. Shared command, 50 MB/s: 10 readers, then 9 and one that never reads",
         "splice-relay shared", ("paced", 50), lambda c: scenario_stall(c, smoke), shared_only),
        # HTTP: the CGI servers people use for this, and webhook; an HTTP/1.0 GET.
        ("http-rate1", "9. HTTP: requests a second, concurrency 1 (one line)", "lighttpd mod_cgi", ("hello",),
         lambda c: scenario_rate(c, smoke, 1), http_who),
        ("http-rate32", "9b. HTTP: requests a second, concurrency 32 (one line)", "lighttpd mod_cgi", ("hello",),
         lambda c: scenario_rate(c, smoke, 32), http_who),
        ("http-bulk", "9c. HTTP: a 256 MiB response, one client", "lighttpd mod_cgi", ("bulk", http_bulk),
         lambda c: scenario_bulk(c, smoke, 1, http_bulk), http_who),
        ("shared-slow", f"8e. {slow_clients} clients of one command ticking once a second, against a command each",
         "splice-relay", ("ticks", 1000, window + 5), lambda c: scenario_slow(c, smoke, slow_clients, window),
         ("splice-relay", "splice-relay shared", "floor shared (C)")),
    ]
    results = []
    with tempfile.TemporaryDirectory(prefix="splice-relay-bench.") as tmpdir:
        tmp = Path(tmpdir)
        for key, title, ref, cmd, measure, *who in plan:
            if only and key not in only:
                continue
            if smoke and not only and key not in SMOKE:
                continue
            if cmd[0] in ("bulk", "vmsplice") and not key.startswith(("ws-", "tls-", "fanout", "http-")):
                cmd = (cmd[0], bulk_bytes(smoke, 4 if key == "bulk4" else 1))
            picks = [c for c in contenders(names, key) if not who or c.name in who[0]]
            results.append(run_scenario(title, ref, cmd, measure, picks, rounds, tmp, smoke))
            if not smoke:
                write_results(results, rounds, args.results)
    remove_cgroups(CGROOT)
    shutil.rmtree(files, ignore_errors=True)

    if smoke:
        print("\nbench: smoke run passed: every contender served every byte")
        return
    chart(results, args.results)
    print("\n" + markdown(results, machine_line(), rounds))


def make_certificate(files):
    """A CA, and an ECDSA P-256 certificate for localhost that it signed,
    served by every TLS contender (the client trusts the CA)."""
    ca_key, ca, key, csr, cert = (files / n for n in ("tls-ca-key.pem", "tls-ca.pem", "tls-key.pem",
                                                      "tls.csr", "tls-cert.pem"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

    def openssl(*args):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=bench CA")
    openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    ext = files / "tls.ext"
    ext.write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
            "-days", "2", "-extfile", ext)
    key.chmod(0o644)
    TLS_FILES.update(cert=cert, key=key)
    os.environ["BENCH_TLS_CA"] = str(ca)


def remove_cgroups(top):
    """Removes a cgroup and those below it (the daemon's leaf, connections'), deepest first."""
    if not top.exists():
        return
    dirs = [p for p in top.rglob("*") if p.is_dir()] + [top]
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        # What is left there (a broadcaster's command outliving it, for a
        # moment) is killed, and gone, first.
        kill, events = d / "cgroup.kill", d / "cgroup.events"
        if kill.exists():
            kill.write_text("1")
            deadline = time.monotonic() + 5
            while "populated 1" in events.read_text() and time.monotonic() < deadline:
                time.sleep(0.02)
        try:
            d.rmdir()
        except OSError as e:
            print(f"bench: cannot remove {d}: {e}")


def write_results(results, rounds, name="latest"):
    """Written after each scenario, so a long run that is stopped keeps what it measured."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(markdown(results, machine_line(), rounds) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine_line(), "results": results}, indent=1))


def chart(results, name):
    """bench/results/NAME.png: one panel a scenario, its first measure for
    each contender (median, min–max), from the same results as NAME.md."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no matplotlib: no chart; `pip install matplotlib` for bench/results/{name}.png)")
        return
    drawn = [(res, *summarize(res)) for res in results]
    drawn = [(res, keys, rows) for res, keys, rows in drawn if rows]
    if not drawn:
        return
    cols = min(3, len(drawn))
    lines = -(-len(drawn) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(6.5 * cols, 3.2 * lines), squeeze=False)
    for ax in axes.flat[len(drawn):]:
        ax.axis("off")
    for ax, (res, keys, rows) in zip(axes.flat, drawn):
        main = keys[0]
        names = [r["contender"] for r in rows]
        med = [r[main][0] for r in rows]
        err = [[m - r[main][1] for m, r in zip(med, rows)], [r[main][2] - m for m, r in zip(med, rows)]]
        colors = ["#4a7ab5" if n.startswith("splice-relay") else "#9a9a9a" for n in names]
        ax.barh(names, med, xerr=err, color=colors)
        ax.set_xlabel(f"{main} (median, min–max)", fontsize=8)
        ax.set_title(res["title"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=90)


if __name__ == "__main__":
    main()
