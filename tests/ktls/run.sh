#!/bin/bash
# The kernel-TLS tests (tests/ktls.rs) in a VM whose kernel has the TLS ULP
# (Debian 12's own, booted by tests/vm/vm.sh): the test binary is built on
# the host and run in the guest, where it starts the daemon and real clients
# (Python's ssl and websockets, curl, openssl) from the host's files.
#
#   tests/ktls/run.sh            builds, then runs every kTLS test
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=$(cargo test --locked --test ktls --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "ktls":
        print(m["executable"])')
[ -x "$bin" ] || { echo "ktls: no test binary built" >&2; exit 1; }
echo "ktls: running $bin in a VM with Debian's kernel"
# One test at a time: the guest's CPUs are emulated, and slow. The test
# that unloads a cipher module (which cannot come back in the guest) last.
last=zz_a_session_the_kernel_refuses_is_closed_and_its_cipher_stays_in_user_space
exec bash tests/vm/vm.sh bash -c '"$0" --ignored --test-threads=1 --skip "$1" && "$0" --ignored --exact "$1"' "$bin" "$last"
