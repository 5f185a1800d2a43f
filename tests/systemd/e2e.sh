#!/usr/bin/env bash
# End-to-end: the Debian package installed under a real systemd, driven the way
# a person does (systemctl, journalctl, editing /etc/splice-relay.toml), with
# real clients inside the container.
#
#   tests/systemd/e2e.sh target/debian/splice-relay_*.deb
#
# Needs root. Outside CI without root it skips, saying so; with CI=true a
# machine that cannot boot the container is a failure.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=harness.sh
source "$here/harness.sh"

deb=${1:?usage: e2e.sh PACKAGE.deb}
if ! sr_can_boot; then
    if [ "${CI:-}" = true ]; then echo "e2e: cannot boot a container here (need root and cgroups)"; exit 1; fi
    echo "e2e: skipped: needs root to boot a throwaway systemd"; exit 0
fi

share=$(mktemp -d /tmp/sr-share.XXXXXX)
cp "$deb" "$share/splice-relay.deb"
cp "$here/client.py" "$share/client.py"
trap 'sr_teardown; rm -rf "$share"' EXIT
sr_boot "sr-e2e-$$" "$share" || exit 1

passed=0 failed=0
failures=()
fail() { echo "    FAIL: $*"; return 1; }
run() {
    local t=$1
    echo "--- $t"
    if "$t"; then
        passed=$((passed + 1)); echo "ok   $t"
    else
        failed=$((failed + 1)); failures+=("$t"); echo "FAIL $t"
        sr_in journalctl -u splice-relay --no-pager -n 25 -o short-monotonic | sed 's/^/    | /'
    fi
}

client() { sr_in python3 /share/client.py "$@"; }
config() { sr_in sh -c 'cat > /etc/splice-relay.toml'; }
# Writes the config from stdin and applies it, as a person would.
reconfigure() { config && sr_in systemctl reload splice-relay; }
show() { sr_in systemctl show -p "$1" --value "$2"; }
# Runs a command to its end and succeeds if its output (stdout and stderr)
# holds WANT. Unlike `cmd | grep -q`, it never cuts the command off with
# SIGPIPE, which `pipefail` would count as a failure.
prints() {
    local want=$1 out; shift
    out=$("$@" 2>&1); [[ $out == *"$want"* ]]
}

# Waits up to 10 s for a command's output to contain a string.
eventually() {
    local want=$1 i out; shift
    for i in $(seq 1 100); do
        out=$("$@" 2>&1); [[ $out == *"$want"* ]] && return 0
        sleep 0.1
    done
    fail "never saw '$want' in: $out"
}

# Succeeds once "$@" prints nothing (within 10 s).
eventually_none() {
    local i
    for i in $(seq 1 100); do
        [ -z "$("$@" 2>/dev/null)" ] && return 0
        sleep 0.1
    done
    return 1
}

# The commands' cgroups under $1 that hold a live process.
busy_slots() {
    sr_in sh -c "grep -l '^populated 1' $1/slot-*/cgroup.events 2>/dev/null"
}

# --- 0. install ----------------------------------------------------------------
t_install() {
    # Container images (this machine's among them) carry a policy-rc.d that
    # forbids maintainer scripts to start services; a real host has none.
    sr_in rm -f /usr/sbin/policy-rc.d
    sr_in dpkg -i /share/splice-relay.deb >/dev/null || return $(fail "dpkg -i failed")
    [ "$(sr_in systemctl is-enabled splice-relay.socket)" = enabled ] || fail "socket not enabled" || return 1
    [ "$(sr_in systemctl is-active splice-relay.socket)" = active ] || fail "socket not started" || return 1
    [ "$(sr_in systemctl is-active splice-relay.service)" = inactive ] || fail "service started before any client" || return 1
    prints /etc/splice-relay.toml sr_in dpkg-query -W -f='${Conffiles}\n' splice-relay || fail "config is not a conffile" || return 1
    [[ $(sr_in splice-relay --version) == 'splice-relay '* ]] || fail "--version" || return 1
    prints SIGHUP sr_in man -l /usr/share/man/man8/splice-relay.8.gz || fail "man page 8" || return 1
    prints kill_grace sr_in man -l /usr/share/man/man5/splice-relay.toml.5.gz || fail "man page 5" || return 1
}

# --- 9. verify and security score ------------------------------------------------
t_units_verify_and_score() {
    local out score
    out=$(sr_in systemd-analyze verify splice-relay.socket splice-relay.service 2>&1)
    [ -z "$out" ] || fail "systemd-analyze verify: $out" || return 1
    score=$(sr_in systemd-analyze security splice-relay.service | sed -n 's/.*Overall exposure level for splice-relay.service: \([0-9.]*\).*/\1/p')
    echo "    exposure: $score"
    awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }' || fail "exposure $score > 2.0"
}

# --- 1. socket activation, byte for byte --------------------------------------------
t_activation() {
    local want got
    want=$(sr_in uname -a)
    got=$(sr_in socat -u TCP:127.0.0.1:9009 -)
    [ "$got" = "$want" ] || fail "got '$got', want '$want'" || return 1
    [ "$(sr_in systemctl is-active splice-relay.service)" = active ] || fail "service not active after a client" || return 1

    reconfigure <<'EOF' || return $(fail "reload")
[[service]]
name = "seq"
command = ["seq", "1", "3000000"]
EOF
    want=$(sr_in sh -c 'seq 1 3000000 | sha256sum' | cut -d' ' -f1)
    got=$(client fetch 127.0.0.1:9009)
    [ "${got#* }" = "$want" ] || fail "checksum: got '$got', want '$want'"
}

# --- 2. live STATUS -----------------------------------------------------------------
t_status() {
    reconfigure <<'EOF' || return $(fail "reload")
[[service]]
name = "stream"
command = ["sh", "-c", "while :; do seq 1 1000; sleep 0.1; done"]
EOF
    client hold 127.0.0.1:9009 4 >/dev/null &
    local holder=$!
    eventually 'Status: "1 active' sr_in systemctl status --no-pager splice-relay || return 1
    # LimitNICE=+0: the launchers run below the event loop, the command at 0.
    # Where the service manager cannot raise RLIMIT_NICE (a container whose
    # host withholds CAP_SYS_RESOURCE), the launchers keep the event loop's
    # priority and say so; the command is at 0 either way.
    local main; main=$(show MainPID splice-relay)
    if sr_in grep -q '^Max nice priority  *20 ' "/proc/$main/limits"; then
        eventually "threads at nice 10" sr_in journalctl -u splice-relay --no-pager || return 1
    else
        echo "    (RLIMIT_NICE stays 0 here: $(sr_in grep '^Max nice' "/proc/$main/limits"))"
        eventually "threads at the event loop's priority" sr_in journalctl -u splice-relay --no-pager || return 1
    fi
    local cmd; cmd=$(sr_in pgrep -f "seq 1 1000; sleep 0.1" | head -n1)
    [ "$(sr_in ps -o ni= -p "$cmd" | tr -d ' ')" = 0 ] || fail "the command's nice: $(sr_in ps -o ni= -p "$cmd")" || return 1
    local text
    text=$(show StatusText splice-relay)
    [[ $text == "1 active, "*" served, "*" sent" ]] || fail "StatusText '$text'" || return 1
    wait "$holder"
}

# --- 3. journal records ------------------------------------------------------------
t_journal() {
    reconfigure <<'EOF' || return $(fail "reload")
[[service]]
name = "noisy"
command = ["sh", "-c", "echo to-stderr >&2; echo out"]
EOF
    [ "$(sr_in socat -u TCP:127.0.0.1:9009 -)" = out ] || fail "output" || return 1
    eventually '"REASON":"output-ended"' sr_in journalctl -u splice-relay SERVICE=noisy -o json --no-pager || return 1
    local rec
    rec=$(sr_in journalctl -u splice-relay SERVICE=noisy REASON=output-ended -o json --no-pager | tail -n1)
    local f
    for f in PEER BYTES BYTES_RECEIVED DURATION_MS EXIT PID CONN; do
        [[ $rec == *"\"$f\":"* ]] || fail "field $f missing in $rec" || return 1
    done
    [[ $rec == *'"BYTES":"4"'* && $rec == *'"EXIT":"0"'* && $rec == *'"PEER":"127.0.0.1:'* ]] || fail "values in $rec" || return 1
    local conn
    conn=$(sed -n 's/.*"CONN":"\([0-9]*\)".*/\1/p' <<<"$rec")
    eventually 'to-stderr' sr_in journalctl -u splice-relay STREAM=stderr CONN="$conn" -o cat --no-pager
}

# --- containment: a cgroup per connection under Delegate=yes ------------------------
t_cgroups() {
    # The command starts a process in a new session that holds its stdout;
    # it waits until that process has left, then says so and exits.
    reconfigure <<'EOF' || return $(fail "reload")
[[service]]
name = "escape"
kill_grace = "500ms"
command = ["sh", "-c", "setsid sh -c ': > /tmp/$0; sleep 60; :' sr-e2e-escaper & while [ ! -e /tmp/sr-e2e-escaper ]; do sleep 0.01; done; echo left"]
EOF
    local unit; unit=/sys/fs/cgroup$(show ControlGroup splice-relay)
    eventually "containment: a cgroup per connection in $unit (delegated by the service manager (user.delegate))" \
        sr_in journalctl -u splice-relay --no-pager || return 1
    # systemd 252 refuses clone3 under RestrictNamespaces=: the child joins.
    eventually "commands start in their cgroup by the child joins its cgroup before exec" \
        sr_in journalctl -u splice-relay --no-pager || return 1
    local own; own=$(sr_in grep '^0::' "/proc/$(show MainPID splice-relay)/cgroup")
    [ "$own" = "0::$(show ControlGroup splice-relay)/daemon" ] || fail "the daemon is not in its leaf: $own" || return 1
    local t0=$SECONDS
    [ "$(sr_in socat -u TCP:127.0.0.1:9009 -)" = left ] || fail "output" || return 1
    [ $((SECONDS - t0)) -le 5 ] || fail "the escaper held the connection $((SECONDS - t0)) s" || return 1
    eventually '"SERVICE":"escape"' sr_in journalctl -u splice-relay REASON=output-ended -o json --no-pager || return 1
    sr_in pgrep -f sr-e2e-escaper >/dev/null && { fail "the escaper outlived its connection"; return 1; }
    local rec; rec=$(sr_in journalctl -u splice-relay SERVICE=escape REASON=output-ended -o json --no-pager | tail -n1)
    [[ $rec =~ \"CPU_USEC\":\"[0-9]+\" ]] || fail "no CPU_USEC in $rec" || return 1
    eventually "daemon" sr_in ls "$unit" || return 1
    # The connection's cgroup is emptied (and kept, ready for the next command).
    eventually_none busy_slots "$unit" || fail "a connection's cgroup still holds a process: $(busy_slots "$unit")" || return 1
    # No memory controller in this container: the limit is refused, with its place.
    printf '[[service]]\nname = "capped"\ncommand = ["true"]\nmemory_max = "64M"\n' | config
    if sr_in systemctl reload splice-relay 2>/dev/null; then fail "memory_max without the controller was accepted"; return 1; fi
    eventually "/etc/splice-relay.toml:4:14: service \"capped\": memory_max: needs the memory controller, which $unit does not offer" \
        sr_in journalctl -u splice-relay --no-pager
}

# --- a shared command: two clients, one command, its own record and cgroup --------
t_shared() {
    reconfigure <<'EOF' || return $(fail "reload")
[[service]]
name = "feed"
command = ["sh", "-c", "while :; do echo tick; sleep 0.1; done"]
shared = true
linger = "500ms"
EOF
    local unit; unit=/sys/fs/cgroup$(show ControlGroup splice-relay)
    sr_in sh -c 'for c in a b; do (timeout 3 socat -u TCP:127.0.0.1:9009 - > /tmp/shared-$c &); done'
    eventually "2 client(s)" show StatusText splice-relay || return 1
    local pid; pid=$(show StatusText splice-relay | sed -n 's/.*shared: feed (pid \([0-9]*\),.*/\1/p')
    local cg; cg=$(sr_in grep '^0::' "/proc/$pid/cgroup") || fail "no shared command running" || return 1
    [[ $cg == "0::$(show ControlGroup splice-relay)"/slot-* ]] || fail "not in a cgroup of its own: $cg" || return 1
    eventually '"REASON":"lingered"' sr_in journalctl -u splice-relay SERVICE=feed -o json --no-pager || return 1
    local rec; rec=$(sr_in journalctl -u splice-relay SERVICE=feed REASON=lingered -o json --no-pager | tail -n1)
    [[ $rec == *'"CLIENTS":"2"'* && $rec == *'"CLIENTS_MAX":"2"'* && $rec == *'"EXIT":"SIGTERM"'* ]] \
        || fail "the command's record: $rec" || return 1
    [[ $rec =~ \"CPU_USEC\":\"[0-9]+\" ]] || fail "no CPU_USEC in $rec" || return 1
    local instance; instance=$(sed -n 's/.*"INSTANCE":"\([0-9]*\)".*/\1/p' <<<"$rec")
    local clients
    clients=$(sr_in journalctl -u splice-relay SERVICE=feed INSTANCE="$instance" REASON=client-gone -o cat --no-pager | wc -l)
    [ "$clients" = 2 ] || fail "$clients client records of instance $instance" || return 1
    local c
    for c in a b; do
        sr_in grep -q tick "/tmp/shared-$c" || fail "client $c saw nothing" || return 1
    done
    eventually_none busy_slots "$unit" || fail "a cgroup still holds a process: $(busy_slots "$unit")" || return 1
}

# --- WebSocket: a browser's protocol on the same socket, contained the same -----------
t_websocket() {
    reconfigure <<'EOF' || return $(fail "reload")
[[service]]
name = "ws"
protocol = "websocket"
console = true
command = ["sh", "-c", "echo hi; while read l; do echo got:$l; done"]
EOF
    local unit; unit=/sys/fs/cgroup$(show ControlGroup splice-relay)
    local out
    out=$(sr_in /usr/bin/python3 -c '
import asyncio, sys, websockets
async def main():
    async with websockets.connect("ws://127.0.0.1:9009/") as ws:
        first = await ws.recv()
        await ws.send("x")
        print(first, await ws.recv(), flush=True)
        # The session is open: its command is in a cgroup of its own.
        ls = await asyncio.create_subprocess_exec(
            "sh", "-c", "grep -l \"^populated 1\" " + sys.argv[1] + "/slot-*/cgroup.events",
            stdout=asyncio.subprocess.PIPE)
        print((await ls.communicate())[0].decode().strip())
    print(ws.close_code)
asyncio.run(main())' "$unit") || return $(fail "the Python client failed: $out")
    [ "$(echo "$out" | sed -n 1p)" = "hi got:x" ] || fail "messages: $out" || return 1
    [[ $(echo "$out" | sed -n 2p) == "$unit"/slot-*/cgroup.events ]] || fail "no cgroup during the session: $out" || return 1
    [ "$(echo "$out" | sed -n 3p)" = 1000 ] || fail "close code: $out" || return 1
    eventually '"MESSAGES_RECEIVED":"1"' \
        sr_in journalctl -u splice-relay SERVICE=ws REASON=client-closed -o json --no-pager || return 1
    local rec; rec=$(sr_in journalctl -u splice-relay SERVICE=ws REASON=client-closed -o json --no-pager | tail -n1)
    [[ $rec =~ \"MESSAGES_SENT\":\"2\" && $rec =~ \"CPU_USEC\":\"[0-9]+\" ]] || fail "record: $rec" || return 1
    # The page, and a request that is not an upgrade: 405, and a refusal in the journal.
    prints '<title>splice-relay console</title>' sr_in curl -fsS http://127.0.0.1:9009/ \
        || fail "no console page" || return 1
    [ "$(sr_in curl -s -o /dev/null -w '%{http_code}' -X POST http://127.0.0.1:9009/)" = 405 ] \
        || fail "POST not refused" || return 1
    eventually 'answered 405: method POST' sr_in journalctl -u splice-relay --no-pager
}

# --- HTTP: curl with a POST body as the command's stdin, an event stream ----------
t_http() {
    reconfigure <<'EOF' || return $(fail "reload")
[[service]]
name = "web"
protocol = "http"
max_body_size = 10000000
command = ["sh", "-c", "echo method=$REQUEST_METHOD; sha256sum"]
EOF
    local want got
    want=$(sr_in sh -c 'head -c 3000000 /dev/urandom > /tmp/body && sha256sum < /tmp/body')
    got=$(sr_in curl -fsS --data-binary @/tmp/body http://127.0.0.1:9009/) || return $(fail "curl POST")
    [ "$got" = "method=POST
$want" ] || fail "POST answered: $got (want $want)" || return 1
    got=$(sr_in curl -fsS -H 'Accept: text/event-stream' http://127.0.0.1:9009/) || return $(fail "curl events")
    [[ $got == *"data: method=GET"* && $got == *"event: end"* ]] || fail "events: $got" || return 1
    eventually '"BYTES_RECEIVED":"3000000"' \
        sr_in journalctl -u splice-relay SERVICE=web REASON=output-ended -o json --no-pager || return 1
    # Two services on the packaged socket, chosen by path. Without
    # FileDescriptorName= systemd names the socket after its unit.
    reconfigure <<'EOF' || return $(fail "reload to a shared socket")
[[service]]
name = "logs"
socket_name = "splice-relay.socket"
protocol = "http"
paths = ["/logs"]
command = ["sh", "-c", "echo logs $PATH_INFO"]

[[service]]
name = "time"
socket_name = "splice-relay.socket"
protocol = "http"
paths = ["/time"]
command = ["echo", "time"]
EOF
    got=$(sr_in curl -fsS http://127.0.0.1:9009/logs/today) || return $(fail "curl /logs/today")
    [ "$got" = "logs /today" ] || fail "/logs/today answered: $got" || return 1
    got=$(sr_in curl -fsS http://127.0.0.1:9009/time) || return $(fail "curl /time")
    [ "$got" = "time" ] || fail "/time answered: $got" || return 1
    got=$(sr_in curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:9009/other)
    [ "$got" = "404" ] || fail "/other answered $got, not 404" || return 1
    eventually 'SERVICE=time' sr_in journalctl -u splice-relay REASON=output-ended -o verbose --no-pager
}

# --- TLS: the key as a systemd credential, as docs/tls.md's drop-in gives it --------
t_tls() {
    sr_in sh -c 'mkdir -p /etc/relay-tls && cd /etc/relay-tls &&
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
            -days 2 -subj "/CN=e2e CA" 2>/dev/null &&
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout relay.key -out relay.csr \
            -subj "/CN=localhost" 2>/dev/null &&
        printf "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n" > relay.ext &&
        openssl x509 -req -in relay.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile relay.ext -out relay.pem 2>/dev/null && chmod 600 relay.key' || return $(fail "certificates")
    # Only root may read the key: the service gets it as a credential.
    sr_in sh -c 'mkdir -p /etc/systemd/system/splice-relay.service.d && cat > /etc/systemd/system/splice-relay.service.d/tls.conf' <<'EOF'
[Service]
LoadCredential=splice-relay.key:/etc/relay-tls/relay.key
LoadCredential=splice-relay.crt:/etc/relay-tls/relay.pem
EOF
    config <<'EOF'
[[service]]
name = "tls"
tls_certificate = "splice-relay.crt"
tls_key = "splice-relay.key"
command = ["sh", "-c", "printf 'HTTP/1.0 200 OK\\r\\n\\r\\n'; echo secret $SSL_PROTOCOL"]
EOF
    sr_in systemctl daemon-reload
    sr_in systemctl restart splice-relay || return $(fail "restart with the credentials")
    local out
    out=$(sr_in curl -sS --cacert /etc/relay-tls/ca.pem --resolve localhost:9009:127.0.0.1 https://localhost:9009/) \
        || return $(fail "curl: $out")
    [ "$out" = "secret TLSv1.3" ] || fail "over TLS: $out" || return 1
    eventually 'userspace' sr_in journalctl -u splice-relay SERVICE=tls REASON=output-ended -o verbose --no-pager || return 1
    eventually 'records are encrypted in the daemon' sr_in journalctl -u splice-relay --no-pager || return 1
    # Plaintext on the TLS port: refused before any command, said in the journal.
    sr_in curl -s -m 5 http://127.0.0.1:9009/ >/dev/null && { fail "plaintext was served"; return 1; }
    eventually 'plaintext HTTP' sr_in journalctl -u splice-relay --no-pager || return 1
    sr_in rm -f /etc/systemd/system/splice-relay.service.d/tls.conf
    sr_in systemctl daemon-reload
}

# --- 5. reload ---------------------------------------------------------------------
t_reload() {
    reconfigure <<'EOF' || return $(fail "reload")
[[service]]
name = "a"
command = ["sh", "-c", "echo A1; sleep 2; echo A2"]
EOF
    local running; running=$(mktemp)
    sr_in socat -u TCP:127.0.0.1:9009 - >"$running" &
    local pid=$!
    eventually A1 cat "$running" || return 1
    config <<'EOF'
[[service]]
name = "b"
command = ["echo", "B"]
EOF
    sr_in systemctl reload splice-relay || return $(fail "reload of a good file failed")
    [ "$(sr_in socat -u TCP:127.0.0.1:9009 -)" = B ] || fail "new connections do not get the new command" || return 1
    wait "$pid"
    [ "$(cat "$running")" = "$(printf 'A1\nA2')" ] || fail "the running stream was cut: $(cat "$running")" || return 1

    # A broken file: `systemctl reload` fails and says why; B goes on.
    printf '[[service]]\nname = "b"\ncommand = ["echo", "C"]\nstdin = 3\n' | config
    if sr_in systemctl reload splice-relay 2>/dev/null; then fail "reload of a broken file succeeded"; return 1; fi
    eventually '/etc/splice-relay.toml:4:9: service "b": stdin:' sr_in journalctl -u splice-relay --no-pager || return 1
    [ "$(sr_in socat -u TCP:127.0.0.1:9009 -)" = B ] || fail "the old config is not serving" || return 1
    # The daemon itself refuses it on SIGHUP too, and STATUS says so.
    sr_in systemctl kill -s HUP splice-relay.service
    eventually 'reload failed, previous config in use' show StatusText splice-relay || return 1
    [ "$(sr_in socat -u TCP:127.0.0.1:9009 -)" = B ] || fail "the old config is not serving after SIGHUP"
}

# --- 6. restart under load ------------------------------------------------------------
t_restart() {
    reconfigure <<'EOF' || return $(fail "reload")
shutdown_timeout = "1s"

[[service]]
name = "r"
command = ["echo", "R"]
EOF
    local storm; storm=$(mktemp)
    client storm 127.0.0.1:9009 400 'R\n' >"$storm" 2>&1 &
    local pid=$!
    sleep 0.3
    sr_in systemctl restart splice-relay || return $(fail "restart 1")
    sr_in systemctl restart splice-relay || return $(fail "restart 2")
    wait "$pid"
    local result; result=$(tail -n1 "$storm")
    echo "    storm (ok failed): $result"
    [ "$result" = "400 0" ] || fail "clients refused during restart: $(cat "$storm")" || return 1

    # A stream running at the stop ends within shutdown_timeout (+ kill_grace).
    reconfigure <<'EOF' || return $(fail "reload")
shutdown_timeout = "1s"
[[service]]
name = "forever"
command = ["sh", "-c", "while :; do echo x; sleep 0.1; done"]
EOF
    local held; held=$(mktemp)
    client hold 127.0.0.1:9009 20 >"$held" &
    pid=$!
    eventually 'Status: "1 active' sr_in systemctl status --no-pager splice-relay || return 1
    local t0=$SECONDS
    sr_in systemctl restart splice-relay || return $(fail "restart 3")
    wait "$pid"
    local took=$((SECONDS - t0))
    echo "    stream ended after ${took}s: $(cat "$held")"
    [[ $(cat "$held") == *" eof" ]] || fail "stream did not end: $(cat "$held")" || return 1
    [ "$took" -le 8 ] || fail "the stream took ${took}s to end"
}

# --- 7. watchdog ---------------------------------------------------------------------
t_watchdog() {
    sr_in mkdir -p /etc/systemd/system/splice-relay.service.d
    printf '[Service]\nWatchdogSec=1s\n' | sr_in sh -c 'cat > /etc/systemd/system/splice-relay.service.d/watchdog.conf'
    sr_in systemctl daemon-reload
    sr_in systemctl restart splice-relay || return $(fail "restart")
    local pid; pid=$(show MainPID splice-relay)
    # Several watchdog intervals must pass; there is nothing to wait on but time.
    sleep 3.5
    [ "$(show MainPID splice-relay)" = "$pid" ] || fail "the daemon was replaced (watchdog?)" || return 1
    [ "$(show NRestarts splice-relay)" = 0 ] || fail "restarted $(show NRestarts splice-relay) times" || return 1
    [ "$(show WatchdogUSec splice-relay)" = 1s ] || fail "WatchdogUSec=$(show WatchdogUSec splice-relay)" || return 1
    sr_in rm /etc/systemd/system/splice-relay.service.d/watchdog.conf
    sr_in systemctl daemon-reload
}

# --- 8. configuration error at start -----------------------------------------------
t_config_error() {
    printf '[[service]]\nname = "bad"\ncommand = []\n' | config
    if sr_in systemctl restart splice-relay 2>/dev/null; then fail "start with a broken config succeeded"; return 1; fi
    local msg='/etc/splice-relay.toml:3:11: service "bad": command: must not be empty'
    eventually "$msg" sr_in systemctl status --no-pager -n 20 splice-relay || return 1
    eventually "$msg" sr_in journalctl -u splice-relay --no-pager || return 1
    [ "$(show ExecMainStatus splice-relay)" = 78 ] || fail "exit status $(show ExecMainStatus splice-relay)" || return 1
    [ "$(show NRestarts splice-relay)" = 0 ] || fail "restarted on a config error" || return 1
    [ "$(sr_in systemctl is-active splice-relay.socket)" = active ] || fail "socket not active" || return 1
    prints LISTEN sr_in ss -Hltn 'sport = :9009' || fail "port 9009 is not held" || return 1
    # Fixed: the next client starts it again.
    printf '[[service]]\nname = "good"\ncommand = ["echo", "fixed"]\n' | config
    sr_in systemctl reset-failed splice-relay
    [ "$(sr_in socat -u TCP:127.0.0.1:9009 -)" = fixed ] || fail "not served after the fix"
}

# --- admission and user switching under the real unit --------------------------------
t_controls() {
    # The shipped unit has no capabilities: a user switch is refused with its
    # position, and the running config stays.
    printf '[[service]]\nname = "who"\ncommand = ["id", "-un"]\nuser = "nobody"\n' | config
    if sr_in systemctl reload splice-relay 2>/dev/null; then fail "reload with user= and no capability succeeded"; return 1; fi
    eventually 'user: running commands as user "nobody" (uid 65534) needs CAP_SETUID and CAP_SETGID' \
        sr_in journalctl -u splice-relay --no-pager || return 1
    [ "$(sr_in socat -u TCP:127.0.0.1:9009 -)" = fixed ] || fail "the previous config is not serving" || return 1
    # The drop-in of docs/systemd.md (and splice-relay(8)) grants them.
    sr_in mkdir -p /etc/systemd/system/splice-relay.service.d
    sr_in sh -c 'cat > /etc/systemd/system/splice-relay.service.d/user.conf' <<'EOF'
[Service]
DynamicUser=no
PrivateUsers=no
CapabilityBoundingSet=CAP_SETUID CAP_SETGID
AmbientCapabilities=CAP_SETUID CAP_SETGID
SystemCallFilter=
SystemCallFilter=@system-service
EOF
    sr_in systemctl daemon-reload
    sr_in systemctl restart splice-relay || return $(fail "restart with the drop-in")
    [ "$(sr_in socat -u TCP:127.0.0.1:9009 -)" = nobody ] || fail "the command did not run as nobody" || return 1
    # A denied client gets nothing and no command; the journal says why.
    printf '[[service]]\nname = "who"\ncommand = ["id", "-un"]\nuser = "nobody"\ndeny = ["127.0.0.0/8"]\n' | reconfigure ||
        return $(fail "reload with deny")
    [ -z "$(sr_in socat -u TCP:127.0.0.1:9009 -)" ] || fail "a denied client got output" || return 1
    eventually "refused 127.0.0.1" sr_in journalctl -u splice-relay --no-pager REASON=denied || return 1
    sr_in rm -r /etc/systemd/system/splice-relay.service.d
    sr_in systemctl daemon-reload
    printf '[[service]]\nname = "good"\ncommand = ["echo", "fixed"]\n' | config
    sr_in systemctl restart splice-relay
}

# --- 4. named sockets and a Unix socket ------------------------------------------------
t_named_sockets() {
    sr_in mkdir -p /etc/systemd/system/splice-relay.socket.d
    printf '[Socket]\nFileDescriptorName=alpha\n' | sr_in sh -c 'cat > /etc/systemd/system/splice-relay.socket.d/name.conf'
    sr_in sh -c 'cat > /etc/systemd/system/splice-relay-beta.socket' <<'EOF'
[Socket]
ListenStream=127.0.0.1:9010
ListenStream=/run/splice-relay-beta.sock
FileDescriptorName=beta
Service=splice-relay.service

[Install]
WantedBy=sockets.target
EOF
    config <<'EOF'
[[service]]
name = "alpha"
command = ["echo", "from alpha"]

[[service]]
name = "beta"
command = ["sh", "-c", "echo from beta over $PROTO"]
EOF
    sr_in systemctl stop splice-relay.service
    sr_in systemctl daemon-reload
    sr_in systemctl restart splice-relay.socket
    sr_in systemctl start splice-relay-beta.socket || return $(fail "beta socket")
    [ "$(sr_in socat -u TCP:127.0.0.1:9009 -)" = "from alpha" ] || fail "alpha" || return 1
    [ "$(sr_in socat -u TCP:127.0.0.1:9010 -)" = "from beta over TCP" ] || fail "beta over TCP" || return 1
    [ "$(sr_in socat -u UNIX-CONNECT:/run/splice-relay-beta.sock -)" = "from beta over UNIX" ] || fail "beta over Unix"
}

# --- upgrade: the daemon is restarted, the socket and its port stay ------------------
t_upgrade() {
    [ "$(sr_in socat -u TCP:127.0.0.1:9009 -)" = "from alpha" ] || fail "not serving before" || return 1
    local before; before=$(show MainPID splice-relay)
    sr_in dpkg -i /share/splice-relay.deb >/dev/null || return $(fail "dpkg -i over the installed package")
    local after; after=$(show MainPID splice-relay)
    [ "$after" != "$before" ] || fail "the daemon was not restarted (MainPID $before)" || return 1
    [ "$(sr_in systemctl is-active splice-relay.socket)" = active ] || fail "socket not active" || return 1
    # The administrator's config is a conffile: the upgrade kept it.
    [ "$(sr_in socat -u TCP:127.0.0.1:9009 -)" = "from alpha" ] || fail "not serving after, or config replaced"
}

# --- removal ---------------------------------------------------------------------------
t_remove() {
    sr_in systemctl stop splice-relay-beta.socket
    sr_in dpkg -r splice-relay >/dev/null || return $(fail "dpkg -r")
    sr_in pgrep -x splice-relay >/dev/null && { fail "splice-relay still running"; return 1; }
    [ "$(sr_in systemctl is-active splice-relay.socket)" != active ] || fail "socket still active" || return 1
    prints LISTEN sr_in ss -Hltn 'sport = :9009' && { fail "port 9009 still open"; return 1; }
    return 0
}

for t in t_install t_units_verify_and_score t_activation t_status t_journal t_cgroups t_shared t_websocket t_http t_tls t_reload t_restart \
         t_watchdog t_config_error t_controls t_named_sockets t_upgrade t_remove; do
    run "$t"
    [ "$t" = t_install ] && [ "$failed" -gt 0 ] && break
done

[ ${#failures[@]} -eq 0 ] || echo "failed: ${failures[*]}"
echo "e2e: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
