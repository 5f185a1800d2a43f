# $1 is 0 after removal, 1 or more after an upgrade (%systemd_postun_with_restart).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart splice-relay.service >/dev/null 2>&1 || :
    fi
fi
