#!/bin/sh
# AICert guest init (qemu platform): mount what the agent needs, configure the network of
# qemu's user-mode NIC, start the Docker engine the agent runs the training in, and run the
# guest agent; nothing else is started. When the agent exits, the VM powers off (qemu then
# exits, and the provider reports it).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

say() { echo "aicert-init: $*" > /dev/console; }
fail() { say "FAILED: $*"; busybox poweroff -f; }

# runc jails a container with pivot_root(2), which refuses to move the initramfs (rootfs
# has no parent mount). Re-root on a bind mount of it: the same files, nothing copied, and
# a root pivot_root accepts.
if [ "$1" != "--rerooted" ]; then
  mount --bind / /mnt || fail "bind-mount the root on /mnt"
  cd /mnt || fail "enter /mnt"
  mount --move . / || fail "move the root's bind mount to /"
  exec chroot . /init --rerooted
fi

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts || fail "mount /dev/pts"
mount -t tmpfs -o mode=1777 tmpfs /dev/shm || fail "mount /dev/shm"
mount -t securityfs securityfs /sys/kernel/security || fail "mount securityfs"
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || fail "mount cgroup2"
mount -t tmpfs -o mode=0755 tmpfs /run || fail "mount /run"
mount -t tmpfs -o mode=1777 tmpfs /tmp || fail "mount /tmp"

while read -r module; do
  busybox insmod "$module" || fail "insmod $module"
done < /etc/aicert/modules

busybox hostname aicert-guest
busybox ip link set lo up || fail "loopback"
busybox ip link set eth0 up || fail "no eth0 (virtio-net)"
busybox ip addr add @ADDRESS@ dev eth0 || fail "address"
busybox ip route add default via @GATEWAY@ || fail "route"
[ -c /dev/tpmrm0 ] || fail "no /dev/tpmrm0 (vTPM)"

# The virtio disk with the given serial (qemu's serial= option), as a /dev path.
disk_with_serial() {
  for block in /sys/block/vd*; do
    if [ "$(cat "$block/serial" 2>/dev/null)" = "$1" ]; then
      echo "/dev/${block##*/}"
      return 0
    fi
  done
  return 1
}

# The run's scratch disk: blank, made for this run by the orchestrator, not part of the
# measured boot. Formatted here, it holds what does not fit in RAM: the engine's storage
# and the agent's work root (unpacked inputs, workspace, outputs). noinit_itable: the inode
# tables of a blank disk read as zeros already; zeroing them would only fill the host file.
scratch=$(disk_with_serial @SCRATCH_SERIAL@) || fail "no scratch disk (virtio serial @SCRATCH_SERIAL@)"
mkfs.ext4 -q -F -m 0 -E lazy_itable_init=1,lazy_journal_init=1,nodiscard "$scratch" \
  || fail "format the scratch disk $scratch"
mkdir -p @SCRATCH_MOUNT@
mount -t ext4 -o noinit_itable "$scratch" @SCRATCH_MOUNT@ || fail "mount the scratch disk $scratch"
say "scratch disk $scratch: $(($(cat "/sys/block/${scratch##*/}/size") / 2097152)) GiB on @SCRATCH_MOUNT@"
mkdir -p @SCRATCH_MOUNT@/docker @DATA_ROOT@
mount --bind @SCRATCH_MOUNT@/docker @DATA_ROOT@ || fail "put the engine's storage on the scratch disk"
dockerd @DOCKERD_ARGUMENTS@ < /dev/null > @DOCKERD_LOG@ 2>&1 &
if ! python3 /@WAIT_FOR_ENGINE@ $! @READY_TIMEOUT@ @SOCKET@ > /dev/console 2>&1; then
  tail -n 5 @DOCKERD_LOG@ > /dev/console
  fail "the docker engine did not come up (its log: @DOCKERD_LOG@)"
fi
say "@READY_MESSAGE@ (uptime $(cut -d ' ' -f 1 /proc/uptime) s)"

mkdir -p @WORK_ROOT@
# The run's inputs, staged by the orchestrator, come as a read-only raw disk (a tar).
# The agent's optional arguments, as the positional parameters (quoted, unlike a variable).
set --
inputs=$(disk_with_serial @INPUTS_SERIAL@) && set -- --staged-inputs "$inputs"
say "starting the guest agent on port @PORT@"
# --tls: a fresh channel key, measured into PCR 14 before the agent serves anything.
/usr/bin/python3 -m aicert.guest_runtime.server --tcti device:/dev/tpmrm0 --platform qemu \
  --host 0.0.0.0 --port @PORT@ --work-root @WORK_ROOT@ --tls "$@" &
agent=$!
wait "$agent"
say "the guest agent exited with status $?; powering off"
busybox poweroff -f
