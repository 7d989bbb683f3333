"""Run untrusted Python (model-written code) in a throw-away sandbox, and bring back the values of test calls.

Each program gets two processes: a supervisor (trusted code only) and, forked from it, the program itself.
The trainer starts the supervisor (`python -I`, fork+exec, no Python between them: safe in threaded trainers),
which dies with the trainer's thread (PR_SET_PDEATHSIG) and sets up, in its own namespaces:
- network: a network namespace with only an unconfigured loopback (abstract unix sockets are per namespace),
  and an IPC namespace;
- filesystem: a mount namespace in which every host mount is read-only, nosuid and nodev, and of the host's
  top-level directories only the system's (/usr, /etc, ...) and the interpreter's own trees are visible (no
  dataset, test file, checkpoint or home directory); a tmpfs of
  `Limits.disk_bytes` over /tmp is the program's working directory and its only writable place (nothing is
  ever written to the host's disk, so nothing is left behind, whoever dies first); /dev is a read-only tmpfs
  holding null, zero, random and urandom; /run is a tmpfs closed to the program (no host daemon's socket)
  that holds its stdout and stderr (nameless files of at most `output_bytes` each);
- pids: a PID namespace whose init is the program: it sees and can signal only itself, and when it dies the
  kernel kills whatever else is in the namespace.
The supervisor forks the program, which then drops to uid/gid 65534 ("user": never root, never the trainer's
uid), drops every capability and sets no_new_privs ("capabilities"), dies with the supervisor, and installs a
seccomp filter ("syscalls"): no new processes or exec, signals only to itself, no ptrace or other processes'
memory, no unshare/setns/mount, no fcntl/ioctl that routes signals (F_SETOWN, F_SETSIG, FIOSETOWN), no prlimit
of another process, no memfd/shmget (memory outside RLIMIT_AS), no AF_UNIX sockets (socketpair stays), no
io_uring, bpf, userfaultfd, perf or keyrings. rlimits bound CPU seconds, address space, file size (which caps
stdout/stderr: they are files on the tmpfs) and open files. The supervisor kills the program at `wall_s`
(a PID namespace's init takes everything with it); the trainer kills the supervisor if it overruns, and when
the trainer dies, the supervisor and then the program die with it (PR_SET_PDEATHSIG chain).

Judging stays outside: after its code ran, the program asks for the test calls (only the call expressions,
never an expected value), evaluates them and writes their values back as tagged JSON (`decode`: plain data
only); the trainer compares them. Layers this machine lacks are found once by `isolation()`;
`require(allow_missing)` refuses to run without them unless the user opted in (without the filesystem layer
the working directory is a host temporary directory, removed by the supervisor or left if it is killed).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)

NETWORK_MARKER = "sandbox: network access is disabled"
LAYERS = {"network": 1, "filesystem": 2, "pids": 4, "user": 8, "capabilities": 16, "syscalls": 32}
NOBODY = 65534
_GRACE_S = 5.0  # the supervisor's own start and report, on top of the program's wall clock

# The supervisor's code, then the program's (after the fork). Trusted: nothing of the program runs before the
# fork, and the program never sees the test calls before it asks for them.
_BOOTSTRAP = r"""
import os, sys

def _main():
    parent, layers, probe, cpu_s, mem_b, out_b, disk_b = map(int, sys.argv[1:8])
    wall_s = float(sys.argv[8])
    import ctypes, json, select, time
    libc = ctypes.CDLL(None, use_errno=True)
    u = ctypes.c_ulong

    def check(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, what + ": " + os.strerror(err))

    def prctl(op, a=0):
        return libc.prctl(op, u(a), u(0), u(0), u(0))

    check(prctl(1, 9), "PR_SET_PDEATHSIG")  # SIGKILL when the trainer's thread that started us ends
    if os.getppid() != parent:  # it ended before that
        os._exit(71)

    def read_exactly(n):  # never past the frame: the test calls behind it are read only after the fork
        buf = b""
        while len(buf) < n:
            chunk = os.read(0, n - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf

    source = read_exactly(int(read_exactly(16))).decode("utf-8", "replace")
    got = 0

    def mount(src, dst, fstype, flags, data=None):
        check(libc.mount(src, dst, fstype, u(flags), data), "mount %s" % dst)

    def setattr_(path, set_, clear, flags=0):  # mount_setattr (442 on every architecture)
        attr = (ctypes.c_uint64 * 4)(set_, clear, 0, 0)
        check(libc.syscall(u(442), ctypes.c_int(-100), path, ctypes.c_uint(flags), attr, ctypes.c_size_t(32)),
              "mount_setattr %s" % path)

    if os.geteuid() != 0 and layers & 7:  # unprivileged: namespaces need a user namespace of our own first
        uid, gid = os.geteuid(), os.getegid()
        try:
            check(libc.unshare(0x10000000), "unshare(CLONE_NEWUSER)")
            for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", "%d %d 1" % (NOBODY, uid)),
                               ("/proc/self/gid_map", "%d %d 1" % (NOBODY, gid))):
                with open(path, "w") as f:
                    f.write(text)
        except OSError:
            layers &= ~7
    got = _layer(got, layers, probe, 1, lambda: check(libc.unshare(0x40000000 | 0x08000000),
                                                      "unshare(CLONE_NEWNET|CLONE_NEWIPC)"))

    def filesystem():
        check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
        mount(None, b"/", None, 0x4000 | 0x40000)  # MS_REC | MS_PRIVATE: nothing propagates back to the host
        devices = []
        for name in (b"null", b"zero", b"random", b"urandom"):  # detached copies, taken before /dev is covered
            if not os.path.exists(b"/dev/" + name):
                continue
            fd = libc.syscall(u(428), ctypes.c_int(-100), b"/dev/" + name, ctypes.c_uint(1 | 0o2000000))
            check(0 if fd >= 0 else -1, "open_tree /dev/" + name.decode())
            devices.append((name, fd))
        setattr_(b"/", 0x1 | 0x2 | 0x4, 0, 0x8000)  # RDONLY | NOSUID | NODEV, recursively (AT_RECURSIVE)
        # Of the host's directories the program sees the system's (SYSTEM_DIRS) and the interpreter's own trees,
        # read-only: every other top-level directory (homes, /root, /work, /mnt, /var, ...: datasets, tests,
        # checkpoints) is covered by an empty tmpfs, into which only the interpreter's trees are bound back.
        import sysconfig
        wanted = {os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                                *sysconfig.get_paths().values()] if os.path.isdir(p)}
        wanted = [w for w in wanted if not any(w.startswith(o + "/") for o in wanted)]  # the outermost ones
        for name in os.listdir("/"):
            top = "/" + name
            if name in SYSTEM_DIRS or os.path.islink(top) or not os.path.isdir(top) or top in wanted:
                continue
            trees = []
            for path in (w for w in wanted if w.startswith(top + "/")):
                fd = libc.syscall(u(428), ctypes.c_int(-100), path.encode(), ctypes.c_uint(1 | 0o2000000 | 0x8000))
                check(0 if fd >= 0 else -1, "open_tree " + path)  # OPEN_TREE_CLONE | AT_RECURSIVE
                trees.append((path, fd))
            mount(b"tmpfs", top.encode(), b"tmpfs", 0x2 | 0x4 | 0x8, b"size=64k,mode=0755")
            for path, fd in trees:
                os.makedirs(path, exist_ok=True)
                check(libc.syscall(u(429), ctypes.c_int(fd), b"", ctypes.c_int(-100), path.encode(), ctypes.c_uint(4)),
                      "move_mount " + path)
                os.close(fd)
            setattr_(top.encode(), 0x1, 0)
        mount(b"tmpfs", b"/tmp", b"tmpfs", 0x2 | 0x4 | 0x8,  # NOSUID | NODEV | NOEXEC
              b"size=%d,nr_inodes=%d,mode=0700,uid=%d,gid=%d" % (disk_b, max(16, disk_b // 4096), NOBODY, NOBODY))
        mount(b"tmpfs", b"/dev", b"tmpfs", 0x2 | 0x8, b"size=64k,mode=0755")
        for name, fd in devices:
            open(b"/dev/" + name, "wb").close()
            check(libc.syscall(u(429), ctypes.c_int(fd), b"", ctypes.c_int(-100), b"/dev/" + name, ctypes.c_uint(4)),
                  "move_mount /dev/" + name.decode())  # MOVE_MOUNT_F_EMPTY_PATH
            os.close(fd)
        setattr_(b"/dev", 0x1, 0)  # the tmpfs under the four nodes: read-only
        # /run: the host daemons' sockets out of sight, and our place for the program's stdout and stderr (a
        # quota of their own: a program that fills its disk can still say why)
        mount(b"tmpfs", b"/run", b"tmpfs", 0x2 | 0x4 | 0x8, b"size=%d,mode=0700" % (2 * out_b + (64 << 10)))

    got = _layer(got, layers, probe, 2, filesystem)
    # CLONE_NEWPID: for the program, forked next
    got = _layer(got, layers, probe, 4, lambda: check(libc.unshare(0x20000000), "unshare(CLONE_NEWPID)"))
    if got & 2:
        work, outputs, scratch = "/tmp", "/run", None
    else:  # no mount namespace: a host directory, removed below (left behind if we are killed)
        import tempfile
        work = outputs = scratch = tempfile.mkdtemp(prefix="zenjax-sandbox-")
        if os.geteuid() == 0:
            os.chown(scratch, NOBODY, NOBODY)  # the program's uid, once it drops root
    out_fd = os.open(outputs, os.O_RDWR | os.O_TMPFILE, 0o600)  # stdout/stderr: nameless files
    err_fd = os.open(outputs, os.O_RDWR | os.O_TMPFILE, 0o600)
    res_r, res_w = os.pipe()  # program -> supervisor: "R" (ready for the calls), then the values
    call_r, call_w = os.pipe()  # supervisor -> program: the calls
    pid = os.fork()
    if pid == 0:
        os.close(res_r)
        os.close(call_w)
        _child(libc, check, prctl, layers, probe, got, work, out_fd, err_fd, res_w, call_r, source,
               cpu_s, mem_b, out_b)
    os.close(res_w)
    os.close(call_r)
    source = None
    calls = b""
    while True:  # the rest of our stdin: the calls, now that the program is a separate process
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        calls += chunk
    pidfd = os.pidfd_open(pid)
    os.set_blocking(call_w, False)
    deadline = time.monotonic() + wall_s
    results, timed_out, overflow, asked = b"", False, False, False
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or overflow:
            os.kill(pid, 9)
            timed_out = not overflow
            break
        writers = [call_w] if asked and calls is not None else []
        readable, writable, _ = select.select([pidfd, res_r], writers, [], left)
        if res_r in readable:
            chunk = os.read(res_r, 1 << 16)
            if not asked and chunk[:1] == b"R":
                asked, chunk = True, chunk[1:]
            results += chunk
            overflow = len(results) > out_b
        if writable:
            try:
                calls = calls[os.write(call_w, calls):]
            except OSError:  # the program closed its end: it gets no calls (and answers none)
                calls = b""
            if not calls:
                os.close(call_w)
                calls = None
        if pidfd in readable:
            break
    status = os.waitpid(pid, 0)[1]
    os.set_blocking(res_r, False)
    try:
        while len(results) <= out_b:
            chunk = os.read(res_r, 1 << 16)
            if not chunk:
                break
            results += chunk
    except BlockingIOError:
        pass

    def captured(fd):
        data = os.pread(fd, out_b + 1, 0)
        return data[:out_b].decode("utf-8", "replace"), len(data) >= out_b  # RLIMIT_FSIZE stopped it there

    if scratch:
        import shutil
        shutil.rmtree(scratch, ignore_errors=True)
    (stdout, out_full), (stderr, err_full) = captured(out_fd), captured(err_fd)
    report = {"layers": got, "rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out, "stdout": stdout,
              "stdout_full": out_full, "stderr": stderr, "stderr_full": err_full, "asked": asked,
              "results": results[:out_b].decode("utf-8", "replace"), "results_full": len(results) > out_b}
    sys.stdout.write(json.dumps(report))
    sys.stdout.flush()
    os._exit(0)


def _layer(got, layers, probe, bit, setup):
    # `got` with `bit` added when `layers` asks for it and `setup()` works. A layer that worked in the probe and
    # fails now is fatal: the supervisor's exit 70 stops the trainer; the program's counts as its crash.
    if not layers & bit:
        return got
    try:
        setup()
        return got | bit
    except OSError as e:
        if probe:
            return got
        os.write(2, ("sandbox: isolation layer %d failed: %s\n" % (bit, e)).encode())
        os._exit(70)


def _child(libc, check, prctl, layers, probe, got, work, out_fd, err_fd, res_w, call_r, source, cpu_s, mem_b,
           out_b):
    import ctypes, json, resource, select
    u = ctypes.c_ulong
    null = os.open("/dev/null", os.O_RDONLY)
    for fd, target in ((null, 0), (out_fd, 1), (err_fd, 2)):
        os.dup2(fd, target)
    for fd in (null, out_fd, err_fd):
        os.close(fd)
    keep = sorted((res_w, call_r))
    os.closerange(3, keep[0])
    os.closerange(keep[0] + 1, keep[1])
    os.closerange(keep[1] + 1, 1 << 16)  # nothing of the trainer's: its pipes stay out of reach
    os.chdir(work)

    def proc():  # this namespace's /proc: the host's processes out of sight
        try:
            check(libc.mount(b"proc", b"/proc", b"proc", u(0x2 | 0x4 | 0x8), None), "mount /proc")
        except OSError:
            check(libc.mount(b"tmpfs", b"/proc", b"tmpfs", u(0x1 | 0x2 | 0x4 | 0x8), b"size=4k"), "hide /proc")

    if got & 4 and got & 2:
        got = _layer(got, layers, probe, 4, proc)
    for res, soft, hard in ((resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
                            (resource.RLIMIT_AS, mem_b, mem_b), (resource.RLIMIT_FSIZE, out_b, out_b),
                            (resource.RLIMIT_NOFILE, 256, 256)):
        cap = resource.getrlimit(res)[1]
        if cap != resource.RLIM_INFINITY:
            soft, hard = min(soft, cap), min(hard, cap)
        resource.setrlimit(res, (soft, hard))

    def bounding():
        cap = 0
        while prctl(24, cap) == 0:  # PR_CAPBSET_DROP until EINVAL
            cap += 1
        prctl(47, 4)  # PR_CAP_AMBIENT_CLEAR_ALL

    def user():
        if os.geteuid() != 0:  # a user namespace maps us to nobody inside, but we are the trainer outside
            raise OSError(1, "not root: the program keeps the trainer's uid outside its user namespace")
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)

    def capabilities():
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
        check(prctl(38, 1), "PR_SET_NO_NEW_PRIVS")

    if layers & 16:
        bounding()  # needs CAP_SETPCAP, which the uid change below takes away
    got = _layer(got, layers, probe, 8, user)
    got = _layer(got, layers, probe, 16, capabilities)
    check(prctl(1, 9), "PR_SET_PDEATHSIG")  # again: a uid change clears it
    if select.select([call_r], [], [], 0)[0] and not os.read(call_r, 1):  # EOF: the supervisor died meanwhile
        os._exit(71)
    got = _layer(got, layers, probe, 32, lambda: _seccomp(libc, check, prctl))
    if probe:
        os.write(res_w, b"R%d" % got)
        os._exit(0)
    blocked = frozenset(("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                         "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"))

    def no_network(event, args):
        if event in blocked:
            raise PermissionError(MARKER + " (" + event + ")")

    sys.addaudithook(no_network)
    sys.argv = ["main.py"]
    main = type(sys)("__main__")
    main.__file__ = "main.py"
    sys.modules["__main__"] = main
    try:
        exec(compile(source, "main.py", "exec"), main.__dict__)
    except SystemExit as e:  # the program ended before the tests: nothing to judge
        sys.stdout.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(res_w, b"R")
    data = b""
    while True:
        chunk = os.read(call_r, 1 << 16)
        if not chunk:
            break
        data += chunk
    setup, calls = json.loads(data)
    exec(compile(setup, "tests", "exec"), main.__dict__)
    values = []
    for call in calls:
        try:
            values.append(["ok", _encode(eval(compile(call, "test", "eval"), main.__dict__))])
        except BaseException as e:
            values.append(["error", type(e).__name__[:100]])
    text = json.dumps(values).encode()
    while text:
        text = text[os.write(res_w, text):]
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _encode(v, depth=0):
    # Exact types only: a subclass or any other object (whatever its __eq__) is refused, not converted.
    t = type(v)
    if depth > 100:
        raise ValueError("nested too deeply")
    if v is None or t in (bool, int, str):
        return v
    if t is float:
        return v if v == v and abs(v) != float("inf") else {"float": repr(v)}
    if t is list:
        return [_encode(x, depth + 1) for x in v]
    if t in (tuple, set, frozenset):
        return {t.__name__: [_encode(x, depth + 1) for x in v]}
    if t is dict:
        return {"dict": [[_encode(k, depth + 1), _encode(x, depth + 1)] for k, x in v.items()]}
    if t is bytes:
        return {"bytes": v.hex()}
    if t is complex:
        return {"complex": [_encode(v.real), _encode(v.imag)]}
    raise TypeError("a %s is not plain data" % t.__name__)


def _seccomp(libc, check, prctl):
    import ctypes
    # name: (x86_64, aarch64); None where the architecture has no such call.
    nrs = {"fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435), "kill": (62, 129),
           "tkill": (200, 130), "tgkill": (234, 131), "fcntl": (72, 25), "ioctl": (16, 29),
           "prlimit64": (302, 261), "socket": (41, 198), "ptrace": (101, 117), "process_vm_readv": (310, 270),
           "process_vm_writev": (311, 271), "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240),
           "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438), "process_madvise": (440, 440),
           "kcmp": (312, 272), "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40),
           "umount2": (166, 39), "pivot_root": (155, 41), "open_tree": (428, 428), "move_mount": (429, 429),
           "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
           "mount_setattr": (442, 442), "memfd_create": (319, 279), "memfd_secret": (447, 447),
           "shmget": (29, 194), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
           "io_uring_register": (427, 427), "bpf": (321, 280), "userfaultfd": (323, 282),
           "perf_event_open": (298, 241), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
           "execve": (59, 221), "execveat": (322, 281)}
    arches = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}
    machine = os.uname().machine
    if machine not in arches:
        raise OSError(38, "no seccomp filter for " + machine)
    audit, col = arches[machine]
    nr = {k: v[col] for k, v in nrs.items() if v[col] is not None}
    me = os.getpid()
    allow, eagain, enosys, eperm = 0x7FFF0000, 0x50000 | 11, 0x50000 | 38, 0x50000 | 1
    ld = lambda off: (0x20, 0, 0, off)  # A = the 32-bit word at `off` of struct seccomp_data
    jeq = lambda k, jt, jf: (0x15, jt, jf, k)
    ret = lambda v: (0x06, 0, 0, v)
    arg = lambda i: ld(16 + 8 * i)  # low word (little-endian): the kernel reads these as int
    prog = [ld(4), jeq(audit, 1, 0), ret(eperm),  # a foreign syscall ABI: refuse everything
            ld(0), (0x35, 0, 1, 0x40000000), ret(eperm)]  # x32 syscall numbers: refuse
    for name in ("fork", "vfork"):
        if name in nr:
            prog += [ld(0), jeq(nr[name], 0, 1), ret(eagain)]
    prog += [ld(0), jeq(nr["clone3"], 0, 1), ret(enosys)]  # glibc then falls back to clone, whose flags we read
    prog += [ld(0), jeq(nr["clone"], 0, 3), arg(0), (0x45, 1, 0, 0x10000), ret(eagain)]  # only CLONE_THREAD
    for name in ("ptrace", "process_vm_readv", "process_vm_writev", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
                 "pidfd_send_signal", "pidfd_getfd", "process_madvise", "kcmp", "unshare", "setns", "mount",
                 "umount2", "pivot_root", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
                 "mount_setattr", "memfd_create", "memfd_secret", "shmget", "io_uring_setup", "io_uring_enter",
                 "io_uring_register", "bpf", "userfaultfd", "perf_event_open", "keyctl", "add_key", "request_key",
                 "execve", "execveat"):
        prog += [ld(0), jeq(nr[name], 0, 1), ret(eperm)]
    # (syscall, argument, refused values): signal routing to other processes, unix sockets to host daemons
    for name, i, values in (("fcntl", 1, (8, 10, 15)),  # F_SETOWN, F_SETSIG, F_SETOWN_EX
                            ("ioctl", 1, (0x8901, 0x8902, 0x5412)),  # FIOSETOWN, SIOCSPGRP, TIOCSTI
                            ("socket", 0, (1,))):  # AF_UNIX
        for v in values:
            prog += [ld(0), jeq(nr[name], 0, 3), arg(i), jeq(v, 0, 1), ret(eperm)]
    # Signals and prlimit only for ourselves: pid 0 (our group / ourselves) or our own pid.
    for name, i in (("kill", 0), ("tkill", 0), ("tgkill", 0), ("prlimit64", 0)):
        prog += [ld(0), jeq(nr[name], 0, 4), arg(i), jeq(me, 2, 0), jeq(0, 1, 0), ret(eperm)]
    prog.append(ret(allow))

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*p) for p in prog])
    check(prctl(38, 1), "PR_SET_NO_NEW_PRIVS")
    check(libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(Prog(len(prog), filters)), ctypes.c_ulong(0),
                     ctypes.c_ulong(0)), "PR_SET_SECCOMP")


NOBODY = %(nobody)d
SYSTEM_DIRS = ("bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "run", "sbin", "sys", "tmp", "usr")
MARKER = %(marker)r
_main()
""".replace("%(marker)r", repr(NETWORK_MARKER)).replace("%(nobody)d", str(NOBODY))


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0  # wall-clock seconds before the program (and all it started) is killed
    cpu_s: int = 10  # CPU seconds (RLIMIT_CPU)
    memory_mb: int = 1024  # address space (RLIMIT_AS); the interpreter itself needs ~50 MB
    output_bytes: int = 1 << 20  # cap on stdout, on stderr, on the returned values and on any file written
    disk_bytes: int = 32 << 20  # cap on all the files the program writes together, stdout/stderr included


@dataclasses.dataclass(frozen=True)
class Result:
    reason: str | None  # None: the program ran to its end and answered every call; else timeout|memory|output|
    # disk|network|processes|wrong|crash|early_exit
    values: list  # per call: ("ok", plain value) or ("error", exception name); [] unless reason is None
    returncode: int
    stdout: str
    stderr: str
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.reason is None


def _execute(source: str, limits: Limits, layers: int, calls: tuple[str, ...] = (), setup: str = "",
             probe: bool = False, timeout: float | None = None) -> dict:
    """Run the bootstrap on `source`; the supervisor's report, or {"timed_out": True} when it overran `timeout`."""
    args = [sys.executable, "-I", "-c", _BOOTSTRAP, str(os.getpid()), str(layers), str(int(probe)),
            str(max(1, int(limits.cpu_s))), str(limits.memory_mb << 20), str(limits.output_bytes),
            str(limits.disk_bytes), str(limits.wall_s)]
    env = {"PATH": os.defpath, "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
    code = source.encode("utf-8", "replace")
    job = b"%16d" % len(code) + code + json.dumps([setup, list(calls)]).encode()
    proc = subprocess.Popen(args, cwd="/", env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    limit = limits.wall_s + _GRACE_S if timeout is None else max(0.0, min(timeout, limits.wall_s + _GRACE_S))
    try:
        out, err = proc.communicate(job, timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()  # the program follows its supervisor (PR_SET_PDEATHSIG)
        proc.communicate()
        return {"timed_out": True, "rc": -signal.SIGKILL}
    try:
        report = json.loads(out)
    except ValueError:
        raise RuntimeError(f"sandbox: the supervisor failed (exit {proc.returncode}): {err.decode()[-2000:]}")
    return report


@functools.cache
def _layers() -> int:
    """Probe once which isolation layers this machine allows."""
    report = _execute("", Limits(wall_s=30), sum(LAYERS.values()), probe=True)
    first = report.get("results", "")
    if not first.isdigit():
        raise RuntimeError(f"sandbox: the isolation probe failed: {report.get('stderr', '')[-2000:]}")
    return int(first)


def isolation() -> dict[str, bool]:
    """Which isolation layers are in effect here (see the module docstring)."""
    got = _layers()
    return {name: bool(got & bit) for name, bit in LAYERS.items()}


def require(allow_missing: str = "") -> None:
    """Refuse (RuntimeError) unless every layer is here or named in `allow_missing` ("all", or names, commas)."""
    missing = [name for name, on in isolation().items() if not on]
    allowed = set(LAYERS) if allow_missing.strip() == "all" else {n.strip() for n in allow_missing.split(",")}
    refused = [n for n in missing if n not in allowed]
    if refused:
        raise RuntimeError(f"sandbox: isolation layers {refused} are not available on this machine, so untrusted "
                           "code would run without them; run as root on Linux >= 5.12 with user namespaces, or "
                           f"accept the risk with the code reward's allow_missing='{','.join(missing)}'")
    for name in missing:
        _warn_missing(name)


@functools.cache
def _warn_missing(name: str) -> None:
    log.warning("sandbox: running without the isolation layer %r (allowed by allow_missing)", name)


_LAST_EXC = re.compile(r"^(\w+(?:\.\w+)*)(?::|$)", re.M)


def _classify(report: dict) -> str:
    rc, stderr = report["rc"], report.get("stderr", "")
    # A SIGKILL we did not send comes from the hard CPU limit (RLIMIT_AS keeps the OOM killer away).
    if report["timed_out"] or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    if NETWORK_MARKER in stderr or "Network is unreachable" in stderr or "gaierror" in stderr:
        return "network"
    if rc == -signal.SIGXFSZ or report["stdout_full"] or report["stderr_full"] or report["results_full"]:
        return "output"
    if "[Errno 28]" in stderr:  # ENOSPC: the tmpfs quota is full (of bytes or of files)
        return "disk"
    if "MemoryError" in stderr:
        return "memory"
    if "BlockingIOError" in stderr or "can't start new thread" in stderr:
        return "processes"
    exc = _LAST_EXC.findall(stderr)
    if exc and exc[-1] == "AssertionError":
        return "wrong"
    return "crash" if rc != 0 else "early_exit"


def decode(v):
    """A value as the program's `_encode` wrote it, rebuilt from plain data only (ValueError if malformed)."""
    if v is None or type(v) in (bool, int, float, str):
        return v
    if type(v) is list:
        return [decode(x) for x in v]
    if type(v) is dict and len(v) == 1:
        (tag, body), = v.items()
        try:
            if tag == "float" and body in ("nan", "inf", "-inf"):
                return float(body)
            if tag in ("tuple", "set", "frozenset") and type(body) is list:
                return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](decode(x) for x in body)
            if tag == "dict" and type(body) is list:
                return {decode(k): decode(x) for k, x in body}
            if tag == "bytes" and type(body) is str:
                return bytes.fromhex(body)
            if tag == "complex" and type(body) is list:
                return complex(*(float(x) for x in body))
        except (TypeError, ValueError):
            pass
    raise ValueError(f"not a value the sandbox writes: {str(v)[:100]}")


def _values(report: dict, n: int) -> list | None:
    """The program's answers to n calls as ("ok", value) / ("error", name), or None if they are malformed."""
    try:
        raw = json.loads(report["results"], parse_constant=lambda c: float(c)) if report["results"] else None
        if type(raw) is not list or len(raw) != n:
            return None
        out = []
        for entry in raw:
            kind, value = entry
            if kind == "ok":
                out.append(("ok", decode(value)))
            elif kind == "error" and type(value) is str:
                out.append(("error", value))
            else:
                return None
        return out
    except (ValueError, TypeError, RecursionError):
        return None


def run_python(source: str, limits: Limits = Limits(), calls: tuple[str, ...] = (), setup: str = "",
               timeout: float | None = None) -> Result:
    """Run `source` under `limits`, then `setup` (e.g. the tests' imports) and the expressions `calls` in its
    namespace; their values come back as plain data. Never raises for anything the program does. `timeout`
    (seconds) stops it earlier than its wall clock (a scoring deadline)."""
    layers = _layers()
    start = time.monotonic()
    report = _execute(source, limits, layers, tuple(calls), setup, timeout=timeout)
    wall = time.monotonic() - start
    if report.get("timed_out") and "stdout" not in report:  # the trainer's own timeout: no report to read
        return Result("timeout", [], -signal.SIGKILL, "", "", wall)
    values = _values(report, len(calls)) if report["rc"] == 0 and report["asked"] else None
    if values is None:
        reason = _classify(report)
        if reason == "early_exit" and report["asked"]:
            reason = "bad_values"  # it asked for the calls but did not answer them as plain data
        return Result(reason, [], report["rc"], report["stdout"], report["stderr"], wall)
    return Result(None, values, report["rc"], report["stdout"], report["stderr"], wall)


def run_many(sources: list[str], limits: Limits = Limits(), max_workers: int | None = None,
             calls: list[tuple[str, ...]] | None = None, setups: list[str] | None = None,
             deadline_s: float | None = None) -> list[Result]:
    """`run_python` over many programs on a bounded thread pool (the threads only wait on subprocesses).
    With `deadline_s`, every program still running that many seconds after the start is stopped, and those not
    started by then are not run: both count as reason "timeout"."""
    _layers()  # probe before the threads start, once
    n = len(sources)
    calls = calls if calls is not None else [()] * n
    setups = setups if setups is not None else [""] * n
    end = time.monotonic() + deadline_s if deadline_s else math.inf
    workers = max(1, min(max_workers or os.cpu_count() or 1, n or 1))

    def one(i):
        left = end - time.monotonic()
        if left <= 0:
            return Result("timeout", [], -signal.SIGKILL, "", "not started: the scoring deadline passed", 0.0)
        return run_python(sources[i], limits, calls[i], setups[i], timeout=None if math.isinf(left) else left)

    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as ex:
        return list(ex.map(one, range(n)))
