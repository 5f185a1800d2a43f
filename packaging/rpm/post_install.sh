# $1 is 1 on install, 2 or more on upgrade. Written out: cargo-generate-rpm
# has no %systemd_post macros.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl enable --now splice-relay.socket >/dev/null 2>&1 || :
    fi
fi
