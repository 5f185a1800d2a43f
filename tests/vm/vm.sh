#!/bin/bash
# Runs a command inside a QEMU VM booted with Debian 12's own kernel
# (linux-image-amd64), for what the kernel this runs on cannot test: the
# kernel's TLS (kTLS, CONFIG_TLS=m there; tests/ktls/run.sh) and cgroup v2
# with its controllers (tests/cgroups/run.sh). The guest sees the host's /
# read-only over 9p with a tmpfs overlay on top (the guest may write
# anywhere; nothing reaches the host but a per-run directory mounted at /io).
# The guest mounts proc, sysfs, devtmpfs and tmpfs on /run and /dev/shm,
# nothing else (no cgroup file system). The command runs as root under bash,
# as PID 1's child, in the caller's directory with the caller's exported
# environment; its output goes to the serial console (stdout).
#
# usage:  tests/vm/vm.sh COMMAND [ARGS...]
# env:    KVM_KERNEL_PKG  the kernel package (default: what linux-image-amd64
#                         depends on, 6.1 on Debian 12)
#         KVM_CACHE       where the kernel and initramfs are kept
#                         (/var/tmp/splice-relay-vm, about 10 MB a kernel)
#         KVM_MEM=1024 KVM_SMP=2 KVM_ACCEL=tcg|kvm KVM_TIMEOUT=900
# Exit status: the command's in the VM (124 on timeout, 125 if the VM died
# without reporting one). It installs what it needs with apt-get.
set -euo pipefail

PKG=${KVM_KERNEL_PKG:-$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')}
if [[ -z $PKG ]]; then
  apt-get update -qq
  PKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[[ -n $PKG ]] || { echo "vm.sh: no kernel package found (apt-cache depends linux-image-amd64)" >&2; exit 2; }
CACHE=${KVM_CACHE:-/var/tmp/splice-relay-vm}/$PKG
MEM=${KVM_MEM:-1024}
SMP=${KVM_SMP:-2}
TIMEOUT=${KVM_TIMEOUT:-900}
# modules preloaded in the initramfs: transport for the root fs, overlay,
# kTLS and every cipher it can ask for (so no request_module() is needed:
# the host has no /lib/modules/<guest-kver>).
MODULES="virtio_pci 9pnet_virtio 9p overlay tls gcm ccm ghash-generic
 ghash-clmulni-intel aesni-intel chacha20poly1305 chacha-x86_64
 poly1305-x86_64 ${KVM_EXTRA_MODULES:-}"

need() { # install missing Debian packages (Debian 12 names)
  local miss=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || miss+=("$p"); done
  if ((${#miss[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${miss[@]}" >/dev/null
  fi
}

build() {
  need qemu-system-x86 busybox-static kmod cpio xz-utils zstd
  mkdir -p "$(dirname "$CACHE")"
  local tmp; tmp=$(mktemp -d "$CACHE.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  local img=$PKG
  (cd "$tmp" && { apt-get download -q "$img" 2>&1 || { apt-get update -qq && apt-get download -q "$img" 2>&1; }; } | grep -v unsandboxed || true)
  dpkg-deb -x "$tmp"/"$img"_*.deb "$tmp/k"
  rm -f "$tmp"/*.deb
  local kv; kv=$(ls "$tmp/k/lib/modules")
  /sbin/depmod -b "$tmp/k" "$kv"        # the .deb ships no modules.dep
  local ir="$tmp/initrd"; mkdir -p "$ir"/{bin,dev,proc,sys,mnt/lower,mnt/rw,newroot,mods}
  cp /bin/busybox "$ir/bin/busybox"
  for a in sh mount umount mkdir insmod switch_root poweroff cat echo sleep; do ln -s busybox "$ir/bin/$a"; done
  : > "$ir/mods/order"
  for m in $MODULES; do
    /sbin/modprobe -d "$tmp/k" -S "$kv" --show-depends "$m" | awk '$1=="insmod"{print $2}'
  done | awk '!seen[$0]++' | while read -r ko; do
    local b; b=$(basename "$ko"); b=${b%.xz}; b=${b%.zst}; b=${b%.gz}
    case $ko in   # busybox insmod may not decompress: store plain .ko
      *.xz) xz -dc "$ko" > "$ir/mods/$b";; *.zst) zstd -qdc "$ko" > "$ir/mods/$b";;
      *.gz) gzip -dc "$ko" > "$ir/mods/$b";; *) cp "$ko" "$ir/mods/$b";;
    esac
    echo "/mods/$b" >> "$ir/mods/order"
  done
  cat > "$ir/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for ko in $(cat /mods/order); do insmod "$ko" || echo "vm.sh: insmod $ko failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /mnt/lower || { echo "vm.sh: 9p mount failed"; poweroff -f; }
mount -t tmpfs -o mode=755 rw /mnt/rw; mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot || { echo "vm.sh: overlay failed"; poweroff -f; }
for d in proc sys dev; do mount --move /$d /newroot/$d; done
mount -t tmpfs tmpfs /newroot/run; mount -t tmpfs tmpfs /newroot/dev/shm 2>/dev/null
mkdir -p /newroot/io; mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 io /newroot/io
exec switch_root /newroot /bin/sh /io/stage2
EOF
  chmod +x "$ir/init"
  (cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) > "$tmp/initrd.gz"
  mkdir -p "$CACHE"
  mv "$tmp/initrd.gz" "$CACHE/initrd.gz"
  cp "$tmp/k/boot/vmlinuz-$kv" "$CACHE/vmlinuz"
  echo "$kv" > "$CACHE/kver"
  rm -rf "$tmp"; trap - EXIT
}

[[ -s $CACHE/vmlinuz && -s $CACHE/initrd.gz ]] || build

IO=$(mktemp -d /tmp/splice-relay-vm-io.XXXXXX)
trap 'rm -rf "$IO"' EXIT
export -p | grep -vE '^declare -x (PWD|OLDPWD|SHLVL|_|TERM|HOME)=' > "$IO/cmd" || true
if (($#)); then printf '%q ' "$@" >> "$IO/cmd"; else echo 'cat /proc/sys/net/ipv4/tcp_available_ulp' >> "$IO/cmd"; fi
echo >> "$IO/cmd"
cat > "$IO/stage2" <<EOF
# runs as PID 1 in the guest, root = host / (read-only 9p) + tmpfs overlay
ip link set lo up 2>/dev/null || busybox ip link set lo up
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
cd $(printf '%q' "$PWD") 2>/dev/null || cd /
bash /io/cmd; echo \$? > /io/rc
sync; echo o > /proc/sysrq-trigger; sleep 10 2>/dev/null
EOF

# Where /dev/kvm exists but the CPU has no vmx or svm flag (a VM without
# nested virtualization), -accel kvm hangs: TCG is what works there.
ACCEL=${KVM_ACCEL:-}
if [[ -z $ACCEL ]]; then
  if [[ -w /dev/kvm ]] && grep -qwE 'vmx|svm' /proc/cpuinfo; then ACCEL=kvm; else ACCEL=tcg; fi
fi
if [[ $ACCEL == kvm ]]; then CPU=host; else CPU=max; fi   # -cpu max: TCG emulates AES-NI/PCLMUL

timeout --foreground -k 5 "$TIMEOUT" qemu-system-x86_64 \
  -accel "$ACCEL" -cpu "$CPU" -m "$MEM" -smp "$SMP" \
  -nodefaults -no-user-config -display none -serial stdio -no-reboot \
  -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initrd.gz" \
  -append "console=ttyS0 panic=-1 loglevel=3 ${KVM_APPEND:-}" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs local,path="$IO",mount_tag=io,security_model=none \
  </dev/null || { rc=$?; [[ $rc == 124 ]] && exit 124; }
[[ -s $IO/rc ]] || exit 125
exit "$(cat "$IO/rc")"
