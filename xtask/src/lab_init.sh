#!/bin/sh
# /init of the lab's L1 initramfs (written by cargo xtask lab). Loads virtio/9p/KVM modules,
# mounts the host's root read-only with the shared folders read-write at their host paths,
# runs /labrun/cmd.sh chrooted into it and leaves the exit status in /labrun/rc.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko || echo "lab: insmod $m failed"
done
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $opts labrun /labrun || { echo "lab: cannot mount the run folder"; reboot -f; }
mount -t 9p -o $opts,cache=loose,ro hostroot /host || { echo "lab: cannot mount the host root"; reboot -f; }
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
# cgroup v2, for the service's per-sandbox limits.
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup || echo "lab: cannot mount cgroup2"
mount -t devtmpfs devtmpfs /host/dev
# devtmpfs has no pts folder: make it, so terminals (tmux in the shell VM test) can open.
mkdir -p /host/dev/pts
mount -t devpts -o ptmxmode=0666,mode=0620 devpts /host/dev/pts || echo "lab: cannot mount devpts"
mount -t tmpfs -o mode=1777 tmpfs /host/tmp
mount -t tmpfs tmpfs /host/run
mount -t tmpfs tmpfs /host/var/tmp 2>/dev/null
while read tag dir; do
    # The folder may sit under a tmpfs mounted above (a clone in /tmp): make its mountpoint.
    mkdir -p "/host$dir" 2>/dev/null
    mount -t 9p -o $opts $tag "/host$dir" || echo "lab: cannot mount $dir"
done < /labrun/mounts
mkdir -p /host/run/lab
mount -o bind /labrun /host/run/lab
ip link set lo up 2>/dev/null
# The optional uplink: QEMU's user-mode network, its fixed addresses (the name servers stay the
# host's: QEMU forwards to them like any other destination).
if [ -e /labrun/uplink ]; then
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
        || echo "lab: cannot bring the uplink up"
fi
# Once per lab image: the kernel's text symbols, to name where a wedged L1 stopped.
[ -e /labrun/want-kallsyms ] && grep ' [tT] ' /proc/kallsyms > /labrun/kallsyms
# A heartbeat the host watches (by the file's host-side mtime): if it stops, the L1 is
# wedged and the host gives up on this run instead of waiting for its timeout.
( while :; do echo > /labrun/heartbeat; sleep 5; done ) &
# A VM that lives as long as the lab, with one never-run vCPU: its software-disabled LAPIC
# keeps KVM's apic_sw_disabled static key enabled, so the VMs the command creates and destroys
# never flip it. Each flip live-patches kernel text (int3 + IPIs to every CPU), and under
# multi-threaded TCG that has wedged the L1 (one CPU spinning in asm_exc_int3, the other in
# smp_call_function_many_cond waiting for it).
chroot /host /usr/bin/python3 -c '
import fcntl, os, time
kvm = os.open("/dev/kvm", os.O_RDWR)
vm = fcntl.ioctl(kvm, 0xAE01, 0)   # KVM_CREATE_VM
fcntl.ioctl(vm, 0xAE60, 0)         # KVM_CREATE_IRQCHIP
fcntl.ioctl(vm, 0xAE41, 0)         # KVM_CREATE_VCPU 0
time.sleep(1 << 30)
' > /labrun/keeper.log 2>&1 &
chroot /host /bin/sh /run/lab/cmd.sh < /dev/null > /labrun/stdout 2> /labrun/stderr
echo $? > /labrun/rc
sync
reboot -f
