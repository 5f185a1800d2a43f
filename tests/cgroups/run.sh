#!/bin/bash
# The containment tests (tests/containment.rs) where cgroup v2 has its
# controllers: in a VM with Debian 12's own kernel (tests/vm/vm.sh), whose
# cgroup v2 is the only hierarchy, so the memory, cpu, pids and io
# controllers are all its. The machines this is built on are hybrid, their
# controllers cgroup v1's, so there the tests of the limits (memory_max and
# its OOM kill, tasks_max, cpu_quota) check nothing. The test binary is built
# on the host and run in the guest, as root, after the guest mounts cgroup2
# at /sys/fs/cgroup and enables the controllers for the cgroups the tests
# make there; SPLICE_RELAY_REQUIRE_CONTROLLERS=1 makes a limit's test fail,
# not skip, if its controller is missing all the same.
#
#   tests/cgroups/run.sh              builds, then runs every containment test
#   tests/cgroups/run.sh ARGS...      passes ARGS to the test binary (a filter)
# env:    KVM_MEM (default 2048 here) and the others of tests/vm/vm.sh;
#         SPLICE_RELAY_ESCAPERS, the escapers of each kind (default 3 here:
#         every kind with every way of leaving, once; 100 on the host)
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=$(cargo test --locked --test containment --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "containment":
        print(m["executable"])')
[ -x "$bin" ] || { echo "cgroups: no test binary built" >&2; exit 1; }
echo "cgroups: running $bin in a VM with Debian's kernel and cgroup v2's controllers"
export KVM_MEM=${KVM_MEM:-2048}
export SPLICE_RELAY_REQUIRE_CONTROLLERS=1
export SPLICE_RELAY_ESCAPERS=${SPLICE_RELAY_ESCAPERS:-3}
# In the guest: cgroup2 at /sys/fs/cgroup (its stage 2 mounts none), the
# controllers enabled for the root's children, where TestCgroup makes its
# cgroups. Then every test, root's included (--include-ignored: a binary
# built by another user marks them ignored), one at a time: the guest's CPUs
# are emulated, and the CPU quota's test measures a share of one.
exec bash tests/vm/vm.sh bash -c '
set -e
cg=/sys/fs/cgroup
grep -q "^cgroup2 $cg " /proc/mounts || mount -t cgroup2 cgroup2 "$cg"
echo "+cpu +io +memory +pids" > "$cg/cgroup.subtree_control"
echo "cgroups: $(uname -r): $cg/cgroup.subtree_control: $(cat "$cg/cgroup.subtree_control")"
exec "$0" --include-ignored --test-threads=1 --show-output "$@"' "$bin" "$@"
