#!/usr/bin/env bash
# Connection rate of systemd's own Accept=yes per-connection units, beside
# tcpserver and splice-relay, all under one real systemd (the throwaway one
# of tests/systemd/harness.sh), with the same producer and client as
# bench/run.py. Also: does Accept=yes with the default trigger limits survive
# a burst? Writes bench/results/accept.md.
#
#   sudo bench/accept.sh [ROUNDS]     (after bench/run.py has built the tools)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-3}
# shellcheck source=../tests/systemd/harness.sh
source "$root/tests/systemd/harness.sh"
bin=$root/target/release
for f in "$bin/splice-relay" "$bin/examples/bench-producer" "$bin/examples/bench-load"; do
    [ -x "$f" ] || { echo "accept.sh: $f missing; run bench/run.py (or cargo build --release --examples) first"; exit 1; }
done
share=$(mktemp -d /tmp/sr-bench-share.XXXXXX)
trap 'sr_teardown; rm -rf "$share"' EXIT
# The container sees this machine's root as it was at boot: the binaries too.
sr_boot "sr-bench-$$" "$share" || exit 1

hello="$bin/examples/bench-producer hello"
unit() { sr_in sh -c "cat > /etc/systemd/system/$1"; }
unit bench-accept.socket <<EOF
[Socket]
ListenStream=127.0.0.1:9400
Accept=yes
Backlog=4096
MaxConnections=4096
# Without this the socket fails after 200 connections in 2 s (see below).
TriggerLimitIntervalSec=0
EOF
unit bench-accept-default.socket <<EOF
[Socket]
ListenStream=127.0.0.1:9403
Accept=yes
Backlog=4096
MaxConnections=4096
EOF
# Accept=yes sockets take no Service=: each needs its own template.
for t in bench-accept@.service bench-accept-default@.service; do
    unit "$t" <<EOF
[Service]
ExecStart=$hello
StandardInput=socket
StandardOutput=socket
StandardError=journal
EOF
done
sr_in sh -c "cat > /run/bench-relay.toml" <<EOF
log_level = "warn"
max_connections = 4096
[[service]]
name = "hello"
listen = "127.0.0.1:9402"
command = ["$bin/examples/bench-producer", "hello"]
max_connections = 4096
EOF
for port in 9404 9405; do
    sr_in sh -c "sed 's/9402/$port/' /run/bench-relay.toml > /run/bench-relay-$port.toml"
done
sr_in systemctl daemon-reload
sr_in systemctl start bench-accept.socket bench-accept-default.socket
sr_in systemd-run -q --unit=bench-tcpserver tcpserver -q -R -H -l 0 -c 2000 -b 1024 127.0.0.1 9401 $hello
sr_in systemd-run -q --unit=bench-relay "$bin/splice-relay" --config /run/bench-relay.toml
# A cgroup per connection: Delegate=yes, as the shipped unit. With
# RestrictNamespaces=yes (as the shipped unit too) systemd refuses clone3,
# and the child joins its cgroup itself; without it, clone3 does it.
sr_in systemd-run -q --unit=bench-relay-cgroups -p Delegate=yes \
    "$bin/splice-relay" --config /run/bench-relay-9404.toml
sr_in systemd-run -q --unit=bench-relay-cgroups-joined -p Delegate=yes -p RestrictNamespaces=yes \
    "$bin/splice-relay" --config /run/bench-relay-9405.toml
for p in 9401 9402 9404 9405; do
    for _ in $(seq 1 100); do sr_in ss -Hltn "sport = :$p" | grep -q LISTEN && break; sleep 0.05; done
done

declare -A label=([9400]="systemd Accept=yes (TriggerLimitIntervalSec=0)" [9401]="tcpserver"
    [9402]="splice-relay, process groups" [9404]="splice-relay, cgroups (clone3)"
    [9405]="splice-relay, cgroups (child joins)")
# (They log at warn: their leaf in the unit's cgroup shows the containment.)
for u in bench-relay-cgroups bench-relay-cgroups-joined; do
    leaf=$(sr_in grep '^0::' "/proc/$(sr_in systemctl show -p MainPID --value "$u")/cgroup")
    echo "$u: $leaf"
    [ "$leaf" = "0::/system.slice/$u.service/daemon" ] || { echo "accept.sh: $u has no cgroup per connection"; exit 1; }
done
results=$share/rate.tsv
: >"$results"
for c in 1 32; do
    for r in $(seq 1 "$rounds"); do
        for port in 9400 9401 9402 9404 9405; do
            out=$(sr_in "$bin/examples/bench-load" rate "127.0.0.1:$port" "$c" 5)
            rate=$(sed -n 's/.*"per_sec":\([0-9.]*\).*/\1/p' <<<"$out")
            failed=$(sed -n 's/.*"failed":\([0-9]*\).*/\1/p' <<<"$out")
            printf '%s\t%s\t%s\t%s\n' "$c" "$port" "$rate" "$failed" >>"$results"
            echo "c=$c round $r ${label[$port]}: $rate/s ($failed failed)"
        done
    done
done

# The default trigger limit (200 activations in 2 s for Accept=yes) puts the
# socket in the failed state: it refuses every client after that.
burst=$(sr_in "$bin/examples/bench-load" rate 127.0.0.1:9403 32 3)
state=$(sr_in systemctl is-active bench-accept-default.socket || true)
echo "default trigger limits, a 3 s burst at concurrency 32: $burst; socket is now $state"

python3 - "$results" "$rounds" "$burst" "$state" >"$root/bench/results/accept.md" <<'PY'
import json, statistics, sys, time, os
path, rounds, burst, state = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
names = {"9400": "systemd `Accept=yes` (`TriggerLimitIntervalSec=0`)", "9401": "tcpserver",
         "9402": "splice-relay, process groups", "9404": "splice-relay, a cgroup per connection (clone3)",
         "9405": "splice-relay, a cgroup per connection (the child joins: `RestrictNamespaces=yes`)"}
rows = {}
for line in open(path):
    c, port, rate, failed = line.split("\t")
    rows.setdefault((c, port), []).append((float(rate), int(failed)))
print("# Accept=yes units beside tcpserver and splice-relay, under one real systemd\n")
print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} vCPUs, systemd 252 in a throwaway container "
      f"(tests/systemd/harness.sh); {rounds} rounds interleaved, 5 s each; `hello` command. "
      "Median (min–max) connections per second; ratio to tcpserver.\n")
print("| contender | concurrency 1 | × tcpserver | × Accept=yes | × process groups "
      "| concurrency 32 | × tcpserver | × Accept=yes | × process groups | failed |")
print("|---" * 10 + "|")
med = {k: statistics.median(r for r, _ in v) for k, v in rows.items()}
for port in ("9400", "9401", "9402", "9404", "9405"):
    cells, failed = [], 0
    for c in ("1", "32"):
        v = [r for r, _ in rows[(c, port)]]
        failed += sum(f for _, f in rows[(c, port)])
        m = med[(c, port)]
        cells += [f"{m:.0f} ({min(v):.0f}–{max(v):.0f})", f"{m / med[(c, '9401')]:.2f}",
                  f"{m / med[(c, '9400')]:.2f}", f"{m / med[(c, '9402')]:.2f}"]
    print(f"| {names[port]} | " + " | ".join(cells) + f" | {failed} |")
print(f"\nWith the default trigger limits, a 3 s burst at concurrency 32 served {burst['ok']} clients "
      f"and failed {burst['failed']}; afterwards the socket unit was **{state}**.")
PY
cat "$root/bench/results/accept.md"
