#!/usr/bin/env python3
"""ipvs_vm: run a command inside a throwaway qemu VM that boots a stock Debian
kernel (which has ip_vs as a module), with the host's root filesystem visible
in the guest.

  ipvs_vm.py setup                      # one-off: fetch + unpack kernel, build initramfs
  ipvs_vm.py run [opts] -- CMD [ARG...] # boot, run CMD as root in the guest, power off
  ipvs_vm.py info                       # show what would be used

Guest view of the host filesystem:
  * the host '/' is shared read-only over virtio-9p and an overlayfs with a
    tmpfs upper layer is put on top, so the guest can write anywhere, but all
    such writes are thrown away when the VM stops;
  * every `--rw DIR` is a separate read-write 9p share mounted on top at the
    same path: writes there go through to the host (as root);
  * /run, /dev/shm are fresh tmpfs (the host's /run is hidden); /tmp is the
    host's /tmp through the overlay; /lib/modules/<kver> points at the
    unpacked Debian kernel's modules, so modprobe and kernel auto-loading work;
  * the guest has no network card: only lo and whatever it creates itself
    (netns, veth, dummy, bridges).

stdout/stderr of CMD arrive on this program's stdout/stderr (virtio-serial),
and this program exits with CMD's exit status.  The guest kernel console goes
to a log file (shown with -v, or its tail on a VM failure).  Exit codes that
come from ipvs-vm itself: 2 = usage/setup problem, 125 = VM failed or timed
out before CMD finished.

Only the Python standard library is used.  Vendored into lbha from the team's reference
tool (ipvs-vm); the project's copy keeps its files in $LBHA_IPVS_VM_HOME
(default /opt/lbha-ipvs-vm) and has no `selftest` (tests/vm/ is lbha's test of it).
"""

import argparse
import glob
import lzma
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

HOME = os.environ.get("LBHA_IPVS_VM_HOME", "/opt/lbha-ipvs-vm")
KERNEL_META_PKG = os.environ.get("IPVS_VM_KERNEL_PKG", "linux-image-amd64")

# Modules the initramfs loads (in this order) before mounting the host root.
BOOT_MODULES = [
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
    "virtio_pci", "virtio_console", "netfs", "fscache", "9pnet",
    "9pnet_virtio", "9p", "overlay",
]

# Environment variables that are not passed into the guest.
ENV_DROP = {"PWD", "OLDPWD", "SHLVL", "_", "TERM_PROGRAM", "SSH_AUTH_SOCK",
            "SSH_AGENT_PID", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY",
            "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "DISPLAY",
            "WAYLAND_DISPLAY", "TMUX", "TMUX_PANE"}


def log(msg):
    sys.stderr.write(f"ipvs-vm: {msg}\n")
    sys.stderr.flush()


def die(msg, code=2):
    log(msg)
    sys.exit(code)


# --------------------------------------------------------------------- cpio
class Cpio:
    """Minimal writer for the 'newc' cpio format the kernel unpacks."""

    def __init__(self):
        self.parts = []
        self.ino = 1

    def _hdr(self, name, mode, size, nlink=1):
        name_b = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0,
                  len(name_b), 0]
        self.ino += 1
        h = b"070701" + b"".join(b"%08x" % f for f in fields) + name_b
        h += b"\0" * (-len(h) % 4)
        self.parts.append(h)

    def add_dir(self, name, mode=0o755):
        self._hdr(name, stat.S_IFDIR | mode, 0, 2)

    def add_file(self, name, data, mode=0o644):
        self._hdr(name, stat.S_IFREG | mode, len(data))
        self.parts.append(data + b"\0" * (-len(data) % 4))

    def add_symlink(self, name, target):
        t = target.encode()
        self._hdr(name, stat.S_IFLNK | 0o777, len(t))
        self.parts.append(t + b"\0" * (-len(t) % 4))

    def finish(self):
        self._hdr("TRAILER!!!", 0, 0)
        data = b"".join(self.parts)
        return data + b"\0" * (-len(data) % 512)


# ------------------------------------------------------------ guest scripts
STAGE1 = r"""#!/bin/busybox sh
# ipvs-vm stage 1: runs from the initramfs as PID 1.
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
. /ipvs-vm/config.sh
fail() { echo "ipvs-vm stage1: $*" >&2; echo "FAIL $*" > /dev/console; poweroff -f; }
for m in $BOOT_MODULES; do
    [ -e /ipvs-vm/mod/$m.ko ] && { insmod /ipvs-vm/mod/$m.ko || echo "insmod $m failed"; }
done
mkdir -p /lower /scratch /newroot
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose,access=any \
    hostroot /lower || fail "cannot mount host root"
mount -t tmpfs -o mode=0755 scratch /scratch
mkdir -p /scratch/upper /scratch/work
OVL=lowerdir=/lower,upperdir=/scratch/upper,workdir=/scratch/work
OVL=$OVL,index=off,xino=off,redirect_dir=off,metacopy=off
mount -t overlay -o $OVL overlay /newroot || fail "cannot mount overlay root"
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mkdir -p /newroot/run/ipvs-vm /newroot/usr/lib/modules
[ -e /newroot/usr/lib/modules/$KVER ] || ln -s "$MODDIR" /newroot/usr/lib/modules/$KVER
i=0
while [ $i -lt $NRW ]; do
    eval "p=\$RW_$i"
    mkdir -p "/newroot$p" 2>/dev/null
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,access=any,cache=none \
        rw$i "/newroot$p" || fail "cannot mount rw share $p"
    i=$((i+1))
done
# multiport virtio-console ports appear asynchronously: wait for all three
n=0
ports() { cat /sys/class/virtio-ports/*/name 2>/dev/null | grep -c '^ipvsvm\.'; }
while [ $n -lt 400 ] && [ "$(ports)" -lt 3 ]; do
    usleep 25000; n=$((n+1))
done
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] && ln -s "/dev/${p##*/}" "/newroot/run/ipvs-vm/$(cat $p/name)"
done
cp /bin/busybox /ipvs-vm/stage2.sh /ipvs-vm/cmd.sh /newroot/run/ipvs-vm/
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /run/ipvs-vm/busybox sh /run/ipvs-vm/stage2.sh
"""

STAGE2 = r"""# ipvs-vm stage 2: PID 1 inside the host-root overlay.
BB=/run/ipvs-vm/busybox
P=/run/ipvs-vm
$BB mkdir -p /dev/pts /dev/shm /dev/mqueue
$BB mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$BB mount -t tmpfs -o mode=1777 shm /dev/shm
$BB mount -t mqueue mqueue /dev/mqueue 2>/dev/null
$BB mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
[ -e /dev/fd ] || $BB ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || $BB ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || $BB ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || $BB ln -s /proc/self/fd/2 /dev/stderr
$BB hostname ipvs-vm
$BB ip link set lo up
echo BOOTED > $P/ipvsvm.ctl
/bin/sh $P/cmd.sh < /dev/null > $P/ipvsvm.out 2> $P/ipvsvm.err
echo "RC $?" > $P/ipvsvm.ctl
$BB sync
$BB poweroff -f
"""


# ----------------------------------------------------------------- helpers
def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def read_text(path):
    with open(path, errors="replace") as f:
        return f.read()


def run_cmd(args, **kw):
    return subprocess.run(args, check=True, **kw)


def kernels():
    """Unpacked kernels under HOME, newest first: (kver, root, bzimage)."""
    out = []
    for img in glob.glob(os.path.join(HOME, "kernel-*", "boot", "vmlinuz-*")):
        root = os.path.dirname(os.path.dirname(img))
        kver = os.path.basename(img)[len("vmlinuz-"):]
        if os.path.isdir(os.path.join(root, "lib", "modules", kver)):
            out.append((kver, root, img))
    out.sort(key=lambda k: os.path.getmtime(k[2]), reverse=True)
    return out


def pick_kernel(want=None):
    ks = kernels()
    if want:
        ks = [k for k in ks if k[0] == want]
    if not ks:
        die(f"no unpacked kernel in {HOME}; run '{sys.argv[0]} setup' first")
    return ks[0]


def extract_vmlinux(bzimage, dest):
    """Decompress the ELF vmlinux out of a bzImage (XZ only, Debian's default)
    so qemu can start it through its PVH entry point (skips the in-guest
    decompressor, which is slow under TCG)."""
    data = read_bytes(bzimage)
    i = data.find(b"\xfd7zXZ\x00")
    if i < 0:
        return False
    try:
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[i:])
    except lzma.LZMAError:
        return False
    if not out.startswith(b"\x7fELF"):
        return False
    with open(dest + ".tmp", "wb") as f:
        f.write(out)
    os.replace(dest + ".tmp", dest)
    return True


def find_busybox():
    for p in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(p):
            info = subprocess.run(["file", "-b", p], capture_output=True,
                                  text=True).stdout if shutil.which("file") else ""
            if not info or "statically" in info or "static-pie" in info:
                return p
    die("a static busybox is needed: apt-get install busybox-static")


def build_base_initramfs(kver, root, dest):
    moddir = os.path.join(root, "lib", "modules", kver)
    bb = find_busybox()
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "ipvs-vm", "ipvs-vm/mod"):
        c.add_dir(d)
    c.add_file("bin/busybox", read_bytes(bb), 0o755)
    for m in BOOT_MODULES:
        hits = glob.glob(os.path.join(moddir, "kernel", "**", m + ".ko"),
                         recursive=True)
        hits += glob.glob(os.path.join(moddir, "kernel", "**",
                                       m.replace("_", "-") + ".ko"),
                          recursive=True)
        if hits:
            c.add_file(f"ipvs-vm/mod/{m}.ko", read_bytes(hits[0]))
    with open(dest + ".tmp", "wb") as f:
        f.write(c.finish())
    os.replace(dest + ".tmp", dest)


# ------------------------------------------------------------------- setup
APT_PACKAGES = ["qemu-system-x86", "busybox-static", "kmod", "ipvsadm",
                "iproute2"]


def cmd_setup(args):
    if args.apt:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if args.apt_update:
            run_cmd(["apt-get", "update"], env=env)
        run_cmd(["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES],
                env=env)
    missing = [t for t in ("qemu-system-x86_64", "depmod", "apt-get", "dpkg")
               if not shutil.which(t)]
    if missing:
        die("missing tools: " + " ".join(missing) +
            "\n  apt-get install --no-install-recommends " +
            " ".join(APT_PACKAGES) + "   (or: setup --apt)")
    find_busybox()
    os.makedirs(HOME, exist_ok=True)
    pkg = args.package
    if not pkg:
        dep = subprocess.run(["apt-cache", "depends", KERNEL_META_PKG],
                             capture_output=True, text=True).stdout
        m = re.search(r"Depends:\s*(linux-image-\S+)", dep)
        if not m:
            die(f"cannot resolve {KERNEL_META_PKG}; run apt-get update first")
        pkg = m.group(1)
    log(f"kernel package: {pkg}")
    kver = pkg[len("linux-image-"):].replace("-unsigned", "")
    root = os.path.join(HOME, "kernel-" + kver)
    dl = os.path.join(HOME, "dl")
    os.makedirs(dl, exist_ok=True)
    have = os.path.isdir(os.path.join(root, "lib", "modules", kver))
    debs = glob.glob(os.path.join(dl, pkg + "_*.deb"))
    if not debs and not have:
        # apt-get download drops privileges to _apt; let it write to a temp
        # dir it can access, then move.
        tmp = tempfile.mkdtemp(prefix="ipvs-vm-dl.")
        os.chmod(tmp, 0o777)
        run_cmd(["apt-get", "download", pkg], cwd=tmp)
        for f in glob.glob(os.path.join(tmp, "*.deb")):
            shutil.move(f, dl)
        shutil.rmtree(tmp, ignore_errors=True)
        debs = glob.glob(os.path.join(dl, pkg + "_*.deb"))
    if not have:
        deb = sorted(debs)[-1]
        log(f"unpacking {os.path.basename(deb)} -> {root}")
        shutil.rmtree(root, ignore_errors=True)
        run_cmd(["dpkg-deb", "-x", deb, root])
    img = os.path.join(root, "boot", "vmlinuz-" + kver)
    if not os.path.exists(img):
        die(f"{img} missing after unpack")
    log("depmod")
    run_cmd(["depmod", "-b", root, kver])
    vml = os.path.join(root, "boot", "vmlinux-" + kver)
    if not os.path.exists(vml):
        if extract_vmlinux(img, vml):
            log(f"extracted {vml} (PVH boot)")
        else:
            log("could not extract vmlinux; will boot the bzImage")
    build_base_initramfs(kver, root, os.path.join(root, "ipvs-vm-initrd.cpio"))
    log(f"ready: kernel {kver} in {root}")
    if not args.no_deb_cleanup:
        for f in glob.glob(os.path.join(dl, "*.deb")):
            os.unlink(f)
    return 0


# ----------------------------------------------------------------- accel
def kvm_status():
    """('ok'|'no'|'pvm', reason)."""
    if not os.path.exists("/dev/kvm"):
        return "no", "/dev/kvm missing"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no", "/dev/kvm not accessible"
    if os.path.isdir("/sys/module/kvm_pvm"):
        return "pvm", ("host KVM is PVM (kvm_pvm), which cannot boot a stock "
                       "kernel")
    try:
        flags = read_text("/proc/cpuinfo")
        if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M):
            return "no", "CPU has no vmx/svm flag"
    except OSError:
        pass
    return "ok", "/dev/kvm usable"


# ------------------------------------------------------------------- run
def guest_env(extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ENV_DROP and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    # make sure the sbin dirs are there for modprobe/ipvsadm/ip
    parts = env["PATH"].split(":")
    for d in ("/usr/sbin", "/sbin"):
        if d not in parts:
            parts.append(d)
    env["PATH"] = ":".join(parts)
    env["HOME"] = "/root"
    env["USER"] = env["LOGNAME"] = "root"
    env["IPVS_VM_GUEST"] = "1"
    for kv in extra:
        k, _, v = kv.partition("=")
        env[k] = v
    return env


def make_run_initramfs(base, dest, kver, moddir, cmd, cwd, env, rw):
    lines = [f"KVER={shlex.quote(kver)}", f"MODDIR={shlex.quote(moddir)}",
             f"BOOT_MODULES={shlex.quote(' '.join(BOOT_MODULES))}",
             f"NRW={len(rw)}"]
    for i, p in enumerate(rw):
        lines.append(f"RW_{i}={shlex.quote(p)}")
    script = ["# generated by ipvs-vm"]
    for k, v in sorted(env.items()):
        script.append(f"export {k}={shlex.quote(v)}")
    script.append(f"cd {shlex.quote(cwd)} || exit 125")
    script.append("exec " + " ".join(shlex.quote(a) for a in cmd))
    # Appended as a second cpio archive: the scripts live here rather than
    # in the cached base archive so that editing this file needs no re-setup.
    c = Cpio()
    c.add_dir("ipvs-vm")
    c.add_file("init", STAGE1.encode(), 0o755)
    c.add_file("ipvs-vm/stage2.sh", STAGE2.encode(), 0o644)
    c.add_file("ipvs-vm/config.sh", ("\n".join(lines) + "\n").encode())
    c.add_file("ipvs-vm/cmd.sh", ("\n".join(script) + "\n").encode())
    with open(dest, "wb") as f:
        with open(base, "rb") as b:
            shutil.copyfileobj(b, f)
        f.write(c.finish())


def qemu_argv(accel, kimg, initrd, append, mem, cpus, rw, console_path,
              out_fd, err_fd, ctl_fd, machine="q35", cpu_model=None):
    a = ["qemu-system-x86_64", "-nodefaults", "-no-user-config",
         "-display", "none", "-vga", "none", "-no-reboot",
         "-machine", f"{machine},accel={accel}",
         "-cpu", cpu_model or ("host" if accel == "kvm" else "max"),
         "-smp", str(cpus), "-m", str(mem),
         "-kernel", kimg, "-initrd", initrd, "-append", append,
         "-chardev", f"file,id=con,path={console_path}",
         "-serial", "chardev:con",
         "-fsdev", "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
         "-device", "virtio-9p-pci,fsdev=root,mount_tag=hostroot"]
    for i, p in enumerate(rw):
        a += ["-fsdev", f"local,id=rw{i},path={p},security_model=none,multidevs=remap",
              "-device", f"virtio-9p-pci,fsdev=rw{i},mount_tag=rw{i}"]
    a += ["-device", "virtio-serial-pci,id=vser"]
    for name, fd in (("out", out_fd), ("err", err_fd), ("ctl", ctl_fd)):
        a += ["-chardev", f"file,id={name},path=/proc/self/fd/{fd},append=on",
              "-device", f"virtserialport,bus=vser.0,chardev={name},name=ipvsvm.{name}"]
    return a


def boot_once(accel, kimg, base_initrd, kver, moddir, args, env, rw,
              boot_timeout, tmp):
    initrd = os.path.join(tmp, f"initrd-{accel}.cpio")
    make_run_initramfs(base_initrd, initrd, kver, moddir, args.command,
                       args.cwd, env, rw)
    console = os.path.join(tmp, f"console-{accel}.log")
    append = "console=ttyS0 panic=-1 rdinit=/init"
    if not args.verbose:
        append += " quiet loglevel=3"
    for x in args.append:
        append += " " + x
    # qemu gets pipes (not /proc/self/fd/1 of this process: re-opening a
    # regular file that way gives qemu its own file offset and output from
    # both sides would overwrite each other); threads copy them out.
    ctl_r, ctl_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    argv = qemu_argv(accel, kimg, initrd, append, args.memory, args.cpus,
                     rw, console, out_w, err_w, ctl_w, args.machine,
                     args.cpu_model)
    if args.verbose:
        log("qemu: " + " ".join(shlex.quote(x) for x in argv))
    t0 = time.monotonic()
    sys.stdout.flush()
    sys.stderr.flush()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            pass_fds=(out_w, err_w, ctl_w),
                            start_new_session=True)
    for fd in (out_w, err_w, ctl_w):
        os.close(fd)
    state = {"booted": None, "rc": None}

    def reader():
        buf = b""
        while True:
            chunk = os.read(ctl_r, 4096)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.decode(errors="replace").strip()
                if line == "BOOTED" and state["booted"] is None:
                    state["booted"] = time.monotonic() - t0
                    if args.verbose or args.timing:
                        log(f"guest up after {state['booted']:.2f}s ({accel})")
                elif line.startswith("RC "):
                    state["rc"] = int(line[3:])
        os.close(ctl_r)

    def copier(src, dst):
        while True:
            chunk = os.read(src, 65536)
            if not chunk:
                break
            dst.write(chunk)
            dst.flush()
        os.close(src)

    threads = [threading.Thread(target=reader, daemon=True),
               threading.Thread(target=copier, args=(out_r, sys.stdout.buffer),
                                daemon=True),
               threading.Thread(target=copier, args=(err_r, sys.stderr.buffer),
                                daemon=True)]
    for th in threads:
        th.start()
    deadline_total = t0 + args.timeout if args.timeout else None
    timed_out = None
    while proc.poll() is None:
        now = time.monotonic()
        if state["booted"] is None and boot_timeout and now - t0 > boot_timeout:
            timed_out = "boot"
            break
        if deadline_total and now > deadline_total:
            timed_out = "run"
            break
        time.sleep(0.05)
    if timed_out:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for th in threads:
        th.join(5)
    wall = time.monotonic() - t0
    if args.verbose and os.path.exists(console):
        sys.stderr.write(read_text(console))
    return state, proc.returncode, wall, timed_out, console


def cmd_run(args):
    if not args.command:
        die("no command given (ipvs-vm run [opts] -- CMD ...)")
    kver, root, bzimage = pick_kernel(args.kernel)
    moddir = os.path.join(root, "lib", "modules", kver)
    base = os.path.join(root, "ipvs-vm-initrd.cpio")
    if not os.path.exists(base):
        die(f"{base} missing; run '{sys.argv[0]} setup'")
    vml = os.path.join(root, "boot", "vmlinux-" + kver)
    kimg = vml if (os.path.exists(vml) and not args.bzimage) else bzimage
    args.cwd = os.path.abspath(args.cwd or os.getcwd())
    rw = []
    for p in args.rw:
        p = os.path.realpath(p)
        if not os.path.isdir(p):
            die(f"--rw {p}: not a directory")
        rw.append(p)
    env = guest_env(args.env)

    accels = args.accel.split(",")
    if accels == ["auto"]:
        st, why = kvm_status()
        accels = ["kvm", "tcg"] if st == "ok" else ["tcg"]
        if st != "ok" and (args.verbose or args.timing):
            log(f"not using KVM: {why}")
    if not accels or any(a not in ("kvm", "tcg") for a in accels):
        die("--accel: auto, kvm, tcg or a list such as kvm,tcg")
    plan = [(a, args.kvm_boot_timeout if a == "kvm" else args.boot_timeout)
            for a in accels]

    tmp = tempfile.mkdtemp(prefix="ipvs-vm.")
    try:
        for n, (accel, bt) in enumerate(plan):
            state, qrc, wall, timed_out, console = boot_once(
                accel, kimg, base, kver, moddir, args, env, rw, bt, tmp)
            if args.timing:
                log(f"accel={accel} wall={wall:.2f}s boot={state['booted']} "
                    f"rc={state['rc']}")
            if state["rc"] is not None:
                return state["rc"]
            last = n == len(plan) - 1
            why = (f"guest did not come up within {bt}s" if timed_out == "boot"
                   else "timed out" if timed_out == "run"
                   else f"qemu exited with {qrc} before the command finished")
            log(f"{accel}: {why}" +
                ("" if last else f"; falling back to {plan[n + 1][0].upper()}"))
            if last:
                tail = ""
                if not args.verbose and os.path.exists(console):
                    tail = read_text(console)[-3000:].strip()
                if tail:
                    sys.stderr.write("---- guest console (tail) ----\n" + tail +
                                     "\n------------------------------\n")
                elif not args.verbose:
                    log("guest console was empty (kernel runs with 'quiet'); "
                        "rerun with -v to see it")
                return 125
    finally:
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 125


def cmd_info(args):
    st, why = kvm_status()
    print(f"LBHA_IPVS_VM_HOME={HOME}")
    print(f"kvm: {st} ({why})")
    for kver, root, _img in kernels():
        vml = os.path.join(root, "boot", "vmlinux-" + kver)
        print(f"kernel {kver}: {root} (vmlinux: {'yes' if os.path.exists(vml) else 'no'})")
    for t in ("qemu-system-x86_64", "busybox", "depmod", "ipvsadm"):
        print(f"{t}: {shutil.which(t)}")
    return 0


def add_run_opts(p):
    p.add_argument("--accel", default="auto",
                   help="auto (default): 'kvm,tcg' if /dev/kvm looks able to "
                        "run a stock kernel, else 'tcg'.  A list is tried in "
                        "order: a KVM guest that is not up after "
                        "--kvm-boot-timeout is killed and the next is tried")
    p.add_argument("-m", "--memory", type=int, default=1024, help="MiB (1024)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--cpu-model", help="qemu -cpu (default: max for TCG, "
                   "host for KVM)")
    p.add_argument("--machine", choices=("q35", "pc"), default="q35",
                   help="qemu machine type (q35; microvm does not boot "
                        "this kernel under TCG)")
    p.add_argument("--rw", action="append", default=[], metavar="DIR",
                   help="host dir shared read-write (writes reach the host)")
    p.add_argument("--cwd", help="working dir in the guest (default: $PWD)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    p.add_argument("--append", action="append", default=[],
                   help="extra kernel command line argument")
    p.add_argument("--kernel", help="kernel version (default: newest unpacked)")
    p.add_argument("--bzimage", action="store_true",
                   help="boot the compressed bzImage instead of vmlinux")
    p.add_argument("--timeout", type=float, default=0,
                   help="kill the VM after this many seconds (0 = none)")
    p.add_argument("--boot-timeout", type=float, default=120,
                   help="TCG: give up if the guest is not up after this (s)")
    p.add_argument("--kvm-boot-timeout", type=float, default=20,
                   help="KVM: fall back to TCG if not up after this (s)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--timing", action="store_true",
                   help="print boot/total timings on stderr")
    p.add_argument("--keep-tmp", action="store_true")


def main():
    ap = argparse.ArgumentParser(prog="ipvs_vm.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="download + unpack kernel, build initramfs")
    s.add_argument("--package", help="kernel package (default: what "
                   f"{KERNEL_META_PKG} depends on)")
    s.add_argument("--apt", action="store_true",
                   help="first apt-get install " + " ".join(APT_PACKAGES))
    s.add_argument("--apt-update", action="store_true",
                   help="with --apt: run apt-get update first")
    s.add_argument("--no-deb-cleanup", action="store_true",
                   help="keep the downloaded .deb in $LBHA_IPVS_VM_HOME/dl")
    r = sub.add_parser("run", help="run a command in the VM")
    add_run_opts(r)
    r.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("info")
    args = ap.parse_args()
    if args.cmd == "run" and args.command and args.command[0] == "--":
        args.command = args.command[1:]
    fn = {"setup": cmd_setup, "run": cmd_run, "info": cmd_info}[args.cmd]
    sys.exit(fn(args))


if __name__ == "__main__":
    main()
