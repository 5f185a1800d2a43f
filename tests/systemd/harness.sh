#!/usr/bin/env bash
# A throwaway real systemd (PID 1, journald, dbus) for end-to-end tests.
#
# Source this file (callers may use `set -euo pipefail`), then:
#   sr_boot NAME SHAREDIR   boot a container whose root is an overlay of this
#                           machine's /; SHAREDIR appears inside as /share
#   sr_in CMD...            run CMD inside, as root, with a clean environment
#   sr_teardown             power it off and remove every trace
#
# The host is never written: the overlay's upper layer is a tmpfs in a private
# mount namespace, and the container has its own network (only lo). Boot takes
# well under a second; teardown a few seconds at most.

SR_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

sr_log() { printf 'harness: %s\n' "$*" >&2; }

# Installs systemd-nspawn when missing, pinned to the installed systemd so apt
# upgrades nothing, and without recommends so nothing edits nsswitch.conf.
sr_need_nspawn() {
    command -v systemd-nspawn >/dev/null && return 0
    local v
    v=$(dpkg-query -W -f='${Version}' systemd) || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "systemd-container=$v" >/dev/null
}

# Whether this machine can boot one at all (root, a cgroup layout we know).
sr_can_boot() {
    [ "$(id -u)" = 0 ] && [ -d /sys/fs/cgroup/unified ] && [ -d /sys/fs/cgroup/systemd ]
}

sr_boot() {
    SR_NAME=$1
    local share=$2
    sr_need_nspawn || { sr_log "cannot install systemd-nspawn"; return 1; }
    SR_STATE=$(mktemp -d "/tmp/sr-$SR_NAME.XXXXXX")

    # The container's own cgroups, entered before nspawn starts, so teardown
    # can always find (and, at worst, kill) everything it started.
    local h
    for h in systemd unified; do mkdir -p "/sys/fs/cgroup/$h/$SR_NAME"; done

    (
        for h in systemd unified; do echo "$BASHPID" >"/sys/fs/cgroup/$h/$SR_NAME/cgroup.procs"; done
        exec unshare --mount --propagation private -- \
            bash "$SR_HERE/harness.sh" --inner "$SR_NAME" "$share" "$SR_STATE"
    ) >"$SR_STATE/console.log" 2>&1 &
    SR_NSPAWN=$!   # the subshell execs unshare, then bash, then nspawn: one pid

    # PID 1 of the container is nspawn's child.
    local i
    SR_PID1=
    for i in $(seq 1 200); do
        SR_PID1=$(pgrep -P "$SR_NSPAWN" -x systemd | head -n1 || true)
        [ -n "$SR_PID1" ] && break
        kill -0 "$SR_NSPAWN" 2>/dev/null || break
        sleep 0.05
    done
    if [ -z "$SR_PID1" ]; then
        sr_log "the container did not start; console:"; cat "$SR_STATE/console.log" >&2
        sr_teardown
        return 1
    fi
    # The boot is done when the system manager says so ("degraded" counts:
    # some unit of this machine's image may fail in a container).
    # Until its bus is up, systemctl fails at once: ask again.
    local state=
    for i in $(seq 1 300); do
        state=$(sr_in timeout 60 systemctl is-system-running --wait 2>/dev/null || true)
        case "$state" in
            running|degraded)
                sr_log "booted $SR_NAME (PID 1 is $SR_PID1 on the host): $state"
                return 0 ;;
        esac
        sleep 0.1
    done
    sr_log "boot did not finish: '$state'; console:"; cat "$SR_STATE/console.log" >&2
    sr_teardown
    return 1
}

sr_in() {
    nsenter -t "$SR_PID1" --all --root --wd -- \
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}

sr_teardown() {
    [ -n "${SR_NAME:-}" ] || return 0
    local i
    # A clean poweroff first; if nspawn died, ask PID 1 directly.
    kill -TERM "$SR_NSPAWN" 2>/dev/null
    for i in $(seq 1 100); do kill -0 "$SR_NSPAWN" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$SR_NSPAWN" 2>/dev/null && [ -n "${SR_PID1:-}" ]; then
        kill -s RTMIN+3 "$SR_PID1" 2>/dev/null
        for i in $(seq 1 50); do kill -0 "$SR_NSPAWN" 2>/dev/null || break; sleep 0.1; done
    fi
    # Last resort: kill whatever is left in our cgroups, then remove them.
    if [ -e "/sys/fs/cgroup/unified/$SR_NAME/cgroup.kill" ]; then
        echo 1 >"/sys/fs/cgroup/unified/$SR_NAME/cgroup.kill" 2>/dev/null
    fi
    wait "$SR_NSPAWN" 2>/dev/null
    local h
    for h in unified systemd; do
        [ -d "/sys/fs/cgroup/$h/$SR_NAME" ] || continue
        find "/sys/fs/cgroup/$h/$SR_NAME" -depth -type d -exec rmdir {} + 2>/dev/null
    done
    rm -rf "$SR_STATE"
    SR_NAME=
}

# --inner: runs in the private mount namespace; becomes systemd-nspawn.
if [ "${1:-}" = --inner ]; then
    set -eu
    name=$2 share=$3 state=$4
    ovl=$state/ovl
    mkdir -p "$ovl"
    mount -t tmpfs tmpfs "$ovl"
    mkdir -p "$ovl/upper" "$ovl/work" "$ovl/root"

    # A minimal boot target: the default one would start every service this
    # machine's image has enabled, taking seconds.
    mkdir -p "$ovl/upper/etc/systemd/system" "$ovl/upper/etc/systemd/journald.conf.d"
    cat >"$ovl/upper/etc/systemd/system/sr-test.target" <<'EOF'
[Unit]
Description=splice-relay end-to-end test system
Requires=sysinit.target sockets.target
Wants=dbus.service
After=sysinit.target sockets.target
AllowIsolate=yes
EOF
    # Keep every log line a test may look for.
    cat >"$ovl/upper/etc/systemd/journald.conf.d/sr-test.conf" <<'EOF'
[Journal]
Storage=volatile
RateLimitIntervalSec=0
EOF
    mount -t overlay overlay -o "lowerdir=/,upperdir=$ovl/upper,workdir=$ovl/work" "$ovl/root"
    # nspawn keeps bookkeeping in /run, which is on disk here: give it a private one.
    mount -t tmpfs tmpfs /run

    # --keep-unit --register=no: there is no host bus or machined.
    # --system-call-filter=bpf: without it IPAddressDeny= is silently not enforced.
    export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1
    exec systemd-nspawn -q -D "$ovl/root" -b -M "$name" --register=no --keep-unit \
        --private-network --link-journal=no --system-call-filter=bpf \
        --console=read-only --bind="$share:/share" systemd.unit=sr-test.target
fi
