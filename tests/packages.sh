#!/usr/bin/env bash
# Checks the built packages: the .deb and the .rpm carry the same files, the
# config is a conffile in both, and both have their systemd scriptlets.
#   tests/packages.sh target/debian/*.deb target/generate-rpm/*.rpm
set -euo pipefail
deb=$1 rpm=$2
status=0
fail() { echo "packages: FAIL: $*"; status=1; }

want=$(cat <<'LIST'
/etc/splice-relay.toml
/usr/bin/splice-relay
/usr/lib/systemd/system/splice-relay.service
/usr/lib/systemd/system/splice-relay.socket
/usr/share/doc/splice-relay/README.md
/usr/share/doc/splice-relay/config.example.toml
/usr/share/doc/splice-relay/docs/configuration.md
/usr/share/doc/splice-relay/docs/console.png
/usr/share/doc/splice-relay/docs/containment.md
/usr/share/doc/splice-relay/docs/hostile-clients.md
/usr/share/doc/splice-relay/docs/how-it-works.md
/usr/share/doc/splice-relay/docs/logging.md
/usr/share/doc/splice-relay/docs/performance.md
/usr/share/doc/splice-relay/docs/systemd.md
/usr/share/doc/splice-relay/docs/testing.md
/usr/share/doc/splice-relay/docs/tls.md
/usr/share/doc/splice-relay/docs/websocket.md
/usr/share/man/man5/splice-relay.toml.5
/usr/share/man/man8/splice-relay.8
LIST
)
# The .deb also carries its copyright file, and gzips man pages.
deb_files=$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { sub(/^\./, "", $6); print $6 }' \
    | grep -v '/copyright$' | sed 's/\.gz$//' | sort)
rpm_files=$(rpm -qlp "$rpm" 2>/dev/null | sort)
[ "$deb_files" = "$want" ] || fail "deb files differ:"$'\n'"$(diff <(echo "$want") <(echo "$deb_files"))"
[ "$rpm_files" = "$want" ] || fail "rpm files differ:"$'\n'"$(diff <(echo "$want") <(echo "$rpm_files"))"

dpkg-deb -I "$deb" conffiles | grep -qx /etc/splice-relay.toml || fail "deb: config is not a conffile"
[ "$(rpm -qp --configfiles "$rpm" 2>/dev/null)" = /etc/splice-relay.toml ] || fail "rpm: config is not %config"
for s in postinst prerm postrm; do
    dpkg-deb -I "$deb" "$s" | grep -q splice-relay.socket || fail "deb: $s does not handle the socket"
done
scripts=$(rpm -qp --scripts "$rpm" 2>/dev/null)
for s in postinstall preuninstall postuninstall; do
    grep -q "^$s scriptlet" <<<"$scripts" || fail "rpm: no $s scriptlet"
done
grep -q 'enable --now splice-relay.socket' <<<"$scripts" || fail "rpm: socket not enabled on install"
grep -q 'try-restart splice-relay.service' <<<"$scripts" || fail "rpm: no restart on upgrade"
# Both man pages render without warnings.
for page in packaging/man/splice-relay.8 packaging/man/splice-relay.toml.5; do
    w=$(man --warnings -l "$page" 2>&1 >/dev/null) || fail "man -l $page failed"
    [ -z "$w" ] || fail "man -l $page: $w"
done
[ $status = 0 ] && echo "packages: deb and rpm carry the same $(wc -l <<<"$want") files, conffile and scriptlets"
exit $status
