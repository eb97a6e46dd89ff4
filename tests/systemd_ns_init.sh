#!/bin/sh
# PID 1 of a fresh PID namespace, started by tests/systemd_ns.py as
#   unshare --fork --pid --mount-proc --mount --propagation private --uts --ipc --cgroup
# (no --net: the daemon under test must reach the sandbox's RabbitMQ and Glance on the
# host's 127.0.0.1). It builds a throw-away view of every place systemd or a service
# writes to, then execs a real systemd as PID 1. Every mount below is made in the private
# mount namespace; none of them is visible on the host.
#
# stdin/stdout/stderr are the slave side of a pty that systemd_ns.py reads: it becomes
# /dev/console inside, so nothing systemd prints can reach the machine's console (ttyS0).
#
# Inputs (environment, set by systemd_ns.py):
#   NSB_UNIT_PATH  the ONLY unit directory of the inner systemd (SYSTEMD_UNIT_PATH)
#   NSB_EMPTY      an empty directory: the generator paths (no getty/fstab/sysv generators)
#   NSB_KEEP       ':'-separated host directories that stay visible under the private /tmp
#   NSB_BINDS      space-separated SRC:DST:ro|rw bind mounts (made before /tmp is hidden)
#   NSB_OVERLAY    directories that get a tmpfs-backed overlay (writes vanish with us)
#   NSB_NOTIFY     where systemd sends READY=1 (a socket systemd_ns.py listens on)
#   NSB_TARGET     the unit systemd boots into
set -eu

P=/run/.nsb

# 1. Private /run: systemd creates /run/systemd/system, which makes host tools believe
#    systemd is the host's init; journald, dbus and credentials live here too.
mount -n -t tmpfs -o mode=0755,nosuid,nodev,size=256m tmpfs /run
mkdir -p $P /run/lock
chmod 1777 /run/lock

# 2. Stash what must survive the private /tmp (the work dir, which holds the unit dir)
#    and our pty, which becomes /dev/console once /dev is private.
i=0
OLDIFS=$IFS
IFS=:
for d in ${NSB_KEEP:-}; do
    mkdir -p "$P/keep$i"
    mount -n --bind "$d" "$P/keep$i"
    i=$((i + 1))
done
IFS=$OLDIFS
touch $P/console
mount -n --bind /proc/self/fd/0 $P/console

# 3. Overlays with a tmpfs upper layer on the writable system directories: StateDirectory=,
#    useradd (the host's /etc/passwd must not change), utmp, the venv's mount point in /opt.
#    The host's files stay readable (lower layer): /etc/pip.conf, /opt/pypi ...
mkdir -p $P/ovl
mount -n -t tmpfs -o mode=0755 tmpfs $P/ovl
for d in ${NSB_OVERLAY:-}; do
    n=$(echo "$d" | tr / _)
    mkdir -p "$P/ovl/u$n" "$P/ovl/w$n"
    mount -n -t overlay overlay -o "lowerdir=$d,upperdir=$P/ovl/u$n,workdir=$P/ovl/w$n" "$d"
done
# The host's persistent journal has the same machine id and the same boot id: without
# this, journalctl inside shows the host's old entries and journald appends to them.
if [ -d /var/log/journal ]; then
    mount -n -t tmpfs -o mode=2755 tmpfs /var/log/journal
fi

# 4. Bind mounts (e.g. the persistent venv at /opt/imagesync, read-write). Made before /tmp
#    is hidden, so a source under /tmp works too.
for b in ${NSB_BINDS:-}; do
    src=${b%%:*}
    rest=${b#*:}
    dst=${rest%:*}
    how=${rest##*:}
    mkdir -p "$dst"
    mount -n --bind "$src" "$dst"
    if [ "$how" = ro ]; then
        mount -n -o remount,bind,ro "$dst"
    fi
done

# 5. Private /tmp: systemd-tmpfiles' "D /tmp" must not empty the host's /tmp, and
#    PrivateTmp= directories vanish with the namespace even after a SIGKILL. Then bring
#    back the kept directories at their own paths.
mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
i=0
IFS=:
for d in ${NSB_KEEP:-}; do
    mkdir -p "$d"
    mount -n --move "$P/keep$i" "$d"
    rmdir "$P/keep$i"
    i=$((i + 1))
done
IFS=$OLDIFS

# 6. Minimal private /dev: no ttyS0 to grab, no /dev/kmsg, no /dev/log symlink on the host's
#    devtmpfs, no block devices, no watchdog device. /dev/console = our pty.
mount -n -t tmpfs -o mode=0755,nosuid,size=4m tmpfs /dev
mknod -m 666 /dev/null c 1 3
mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/full c 1 7
mknod -m 666 /dev/random c 1 8
mknod -m 666 /dev/urandom c 1 9
mknod -m 666 /dev/tty c 5 0
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -n -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -n -t mqueue -o nosuid,nodev,noexec mqueue /dev/mqueue
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
touch /dev/console
mount -n --move $P/console /dev/console

# 7. /sys: a read-only, NON-recursive bind (a fresh sysfs belongs with a network namespace
#    of its own; we share the host's). Non-recursive hides the host's cgroup v1 trees,
#    debugfs etc. Then our own cgroup2 on /sys/fs/cgroup: inside the cgroup namespace its
#    root is the fresh directory systemd_ns.py made, so the inner systemd runs in pure
#    unified mode in a subtree of its own and never touches the host's v1/name=systemd trees.
mount -n --bind /sys /sys
mount -n -o remount,bind,ro,nosuid,nodev,noexec /sys
mount -n -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup

# 8. No global side effects through /proc (PID 1 would raise fs.file-max and fs.nr_open).
mount -n --bind /proc/sys /proc/sys
mount -n -o remount,bind,ro /proc/sys
if [ -e /proc/sysrq-trigger ]; then
    mount -n --bind /proc/sysrq-trigger /proc/sysrq-trigger
    mount -n -o remount,bind,ro /proc/sysrq-trigger
fi

# 9. Manager settings for this instance (in the private /run). core_pattern on this machine
#    is a plain "core": a watchdog SIGABRT would otherwise drop core files in a service's cwd.
mkdir -p /run/systemd/system.conf.d
cat > /run/systemd/system.conf.d/50-nsboot.conf <<EOF
[Manager]
DefaultLimitCORE=0
DefaultTimeoutStartSec=30s
DefaultTimeoutStopSec=10s
EOF

# 10. Shared propagation inside our namespace, as on a normal systemd host (new peer groups:
#     unshare --propagation private cut the ties to the host first). LoadCredential= and
#     other set-up-then-propagate mounts silently fail without it.
mount -n --make-rshared /

cd /
# 11. A real systemd, clean environment. container=other: no remount of /, no release agent,
#     and reboot()/poweroff end only this PID namespace. SYSTEMD_UNIT_PATH without a trailing
#     ':' makes our directory the only search path (no rabbitmq/mariadb/getty units exist);
#     empty generator paths mean no sysv wrappers for /etc/init.d scripts.
exec env -i \
    container=other \
    SYSTEMD_UNIT_PATH="$NSB_UNIT_PATH" \
    SYSTEMD_GENERATOR_PATH="$NSB_EMPTY" \
    SYSTEMD_ENVIRONMENT_GENERATOR_PATH="$NSB_EMPTY" \
    SYSTEMD_PROC_CMDLINE="" \
    NOTIFY_SOCKET="$NSB_NOTIFY" \
    LANG=C.UTF-8 \
    /lib/systemd/systemd --system \
        --unit="${NSB_TARGET:-default.target}" \
        --log-target=journal \
        --log-level="${NSB_LOG_LEVEL:-info}" \
        --log-color=no \
        --show-status=yes
