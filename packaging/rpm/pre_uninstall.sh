# $1 is 0 on removal, 1 or more on upgrade (%systemd_preun).
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl disable --now splice-relay.socket splice-relay.service >/dev/null 2>&1 || :
fi
