"""Run untrusted Python (model-written code plus its tests) in a throw-away subprocess.

Each program gets a fresh `python -I` in its own session (process group) and temporary directory. Before
the program runs, the child sets up, in this order:
- namespaces (`unshare`): a private network namespace with only an unconfigured loopback, and a private mount
  namespace in which every mount is read-only except the working directory (a user namespace is added
  when we are not root);
- a disk quota: the working directory becomes a tmpfs of `Limits.disk_bytes` (and as many inodes as 4 KiB pages
  fit), mounted in that namespace, so what a program writes never reaches the host's disk; being tmpfs, it is
  memory, bounded by the quota, which the address-space limit does not count;
- rlimits: CPU seconds, address space, and file size, which also caps stdout/stderr: both go to files, and a
  write past the cap fails (EFBIG; Python ignores SIGXFSZ);
- dropped capabilities (bounding, ambient, effective, permitted) and no_new_privs, so root in the sandbox
  cannot undo any of this;
- a seccomp filter: no fork/vfork/clone without CLONE_THREAD (no new processes, threads allowed), signals only
  to itself, no ptrace or reads/writes of other processes' memory. This is what stops a fork bomb:
  RLIMIT_NPROC cannot (the kernel exempts uid 0 and we run as root), seccomp can, for any uid;
- an audit hook that refuses socket connect/bind/sendto/DNS with a recognisable message.
Layers the machine does not allow are found once by `isolation()`, logged as warnings and skipped; a layer
that worked in that probe and then fails aborts the run. The wall-clock limit kills the whole process group.
The parent never runs Python between fork and exec (no preexec_fn), so it is safe in threaded trainers.

A program counts as passed only if it runs to its end: the child then writes a nonce (sent through a pipe,
held in a local of the bootstrap, not in any module) to stdout, so `sys.exit(0)` or `os._exit(0)` before the
tests cannot fake a pass. (Frame introspection could still find the nonce: this stops lazy shortcuts a policy
stumbles on, not a program written to attack the reward.)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

log = logging.getLogger(__name__)

NETWORK_MARKER = "sandbox: network access is disabled"
LAYERS = {"network": 1, "filesystem": 2, "capabilities": 4, "processes": 8, "disk": 16}  # bits for the child

# The child's first code. It runs as a function so the nonce is a local the program cannot import.
_BOOTSTRAP = r"""
import os, sys

def _main():
    nonce_fd, layers, probe, cpu_s, mem_b, out_b, disk_b = map(int, sys.argv[1:8])
    nonce = os.read(nonce_fd, 64)
    os.close(nonce_fd)
    import ctypes, resource
    libc = ctypes.CDLL(None, use_errno=True)
    c_ulong = ctypes.c_ulong

    def check(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, what + ": " + os.strerror(err))

    got = 0
    userns = [os.geteuid() != 0]  # unprivileged: a namespace needs a user namespace of our own first

    def layer(bit, setup):
        nonlocal got
        if layers & bit:
            try:
                setup()
                got |= bit
            except OSError as e:
                if not probe:
                    os.write(2, ("sandbox: isolation layer %d failed: %s\n" % (bit, e)).encode())
                    os._exit(70)

    def unshare(flags):
        if userns[0]:
            uid, gid = os.geteuid(), os.getegid()
            check(libc.unshare(flags | 0x10000000), "unshare")  # CLONE_NEWUSER
            userns[0] = False
            for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", "0 %d 1" % uid),
                               ("/proc/self/gid_map", "0 %d 1" % gid)):
                with open(path, "w") as f:
                    f.write(text)
        else:
            check(libc.unshare(flags), "unshare")

    def network():
        unshare(0x40000000)  # CLONE_NEWNET

    def filesystem():
        unshare(0x00020000)  # CLONE_NEWNS
        check(libc.mount(None, b"/", None, c_ulong(0x4000 | 0x40000), None), "mount MS_REC|MS_PRIVATE")
        attr = (ctypes.c_uint64 * 4)(0x1 | 0x2, 0, 0, 0)  # set MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
        check(libc.syscall(c_ulong(442), ctypes.c_int(-100), b"/", ctypes.c_uint(0x8000), attr, ctypes.c_size_t(32)),
              "mount_setattr(AT_RECURSIVE)")  # 442 = mount_setattr on every architecture
        work = os.getcwd().encode()
        check(libc.mount(work, work, None, c_ulong(0x1000), None), "bind the working directory")  # MS_BIND
        attr = (ctypes.c_uint64 * 4)(0, 0x1, 0, 0)  # the bind copied read-only: clear it on this mount alone
        check(libc.syscall(c_ulong(442), ctypes.c_int(-100), work, ctypes.c_uint(0), attr, ctypes.c_size_t(32)),
              "mount_setattr(work)")
        os.chdir(work)  # step onto the writable mount now covering the old one

    def disk():
        if not got & 2:
            raise OSError(1, "needs the filesystem layer's mount namespace")
        with open("main.py", "rb") as f:
            source = f.read()
        work = os.getcwd().encode()
        options = b"size=%d,nr_inodes=%d,mode=0700" % (disk_b, max(16, disk_b // 4096))
        check(libc.mount(b"tmpfs", work, b"tmpfs", c_ulong(0x2 | 0x4 | 0x8), options),  # NOSUID|NODEV|NOEXEC
              "mount the tmpfs quota")
        os.chdir(work)  # onto the tmpfs
        with open("main.py", "wb") as f:
            f.write(source)

    def capabilities():
        check(libc.prctl(38, c_ulong(1), c_ulong(0), c_ulong(0), c_ulong(0)), "PR_SET_NO_NEW_PRIVS")
        cap = 0
        while libc.prctl(24, c_ulong(cap), c_ulong(0), c_ulong(0), c_ulong(0)) == 0:  # PR_CAPBSET_DROP until EINVAL
            cap += 1
        libc.prctl(47, c_ulong(4), c_ulong(0), c_ulong(0), c_ulong(0))  # PR_CAP_AMBIENT_CLEAR_ALL
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")

    def processes():
        # (audit arch, fork+vfork, clone, clone3, kill, tkill+tgkill, always refused: ptrace, process_vm_readv/
        # writev, rt_sigqueueinfo, rt_tgsigqueueinfo, pidfd_send_signal, pidfd_getfd)
        arches = {"x86_64": (0xC000003E, (57, 58), 56, 435, 62, (200, 234), (101, 310, 311, 129, 297, 424, 438)),
                  "aarch64": (0xC00000B7, (), 220, 435, 129, (130, 131), (117, 270, 271, 138, 240, 424, 438))}
        machine = os.uname().machine
        if machine not in arches:
            raise OSError(38, "no seccomp filter for " + machine)
        audit, forks, clone, clone3, kill, tkills, refused = arches[machine]
        me = os.getpid()
        allow, eagain, enosys, eperm = 0x7FFF0000, 0x50000 | 11, 0x50000 | 38, 0x50000 | 1
        ld = lambda off: (0x20, 0, 0, off)  # A = 32-bit word at `off` of struct seccomp_data
        jeq = lambda k, jt, jf: (0x15, jt, jf, k)
        ret = lambda v: (0x06, 0, 0, v)
        prog = [ld(4), jeq(audit, 1, 0), ret(eperm),  # a foreign syscall ABI: refuse everything
                ld(0), (0x35, 0, 1, 0x40000000), ret(eperm)]  # x32 syscall numbers: refuse
        for nr in forks:
            prog += [jeq(nr, 0, 1), ret(eagain)]
        for nr in refused:
            prog += [jeq(nr, 0, 1), ret(eperm)]
        prog += [jeq(clone3, 0, 1), ret(enosys)]  # glibc then falls back to clone, whose flags a filter can read
        # Signals only to ourselves (pid 0 = our own process group, which is just us).
        prog += [jeq(kill, 0, 5), ld(16), jeq(me, 1, 0), jeq(0, 0, 1), ret(allow), ret(eperm)]
        for nr in tkills:
            prog += [jeq(nr, 0, 4), ld(16), jeq(me, 0, 1), ret(allow), ret(eperm)]
        prog += [jeq(clone, 1, 0), ret(allow), ld(16), (0x45, 0, 1, 0x10000), ret(allow), ret(eagain)]  # CLONE_THREAD

        class Filter(ctypes.Structure):
            _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

        filters = (Filter * len(prog))(*[Filter(*p) for p in prog])
        check(libc.prctl(38, c_ulong(1), c_ulong(0), c_ulong(0), c_ulong(0)), "PR_SET_NO_NEW_PRIVS")
        check(libc.prctl(22, c_ulong(2), ctypes.byref(Prog(len(prog), filters)), c_ulong(0), c_ulong(0)),
              "PR_SET_SECCOMP")

    layer(1, network)
    layer(2, filesystem)
    layer(16, disk)
    # CPU: SIGXCPU at the soft limit (reported as a timeout), SIGKILL a second later if the program catches it.
    for res, soft, hard in ((resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
                            (resource.RLIMIT_AS, mem_b, mem_b), (resource.RLIMIT_FSIZE, out_b, out_b)):
        cap = resource.getrlimit(res)[1]
        if cap != resource.RLIM_INFINITY:
            soft, hard = min(soft, cap), min(hard, cap)
        resource.setrlimit(res, (soft, hard))
    layer(4, capabilities)
    layer(8, processes)
    if probe:
        os.write(1, b"%d\n" % got)
    blocked = frozenset(("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                         "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"))

    def no_network(event, args):
        if event in blocked:
            raise PermissionError(MARKER + " (" + event + ")")

    sys.addaudithook(no_network)
    with open("main.py", encoding="utf-8") as f:
        code = compile(f.read(), "main.py", "exec")
    sys.argv = ["main.py"]
    main = type(sys)("__main__")
    main.__file__ = "main.py"
    sys.modules["__main__"] = main
    exec(code, main.__dict__)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, b"\n" + nonce + b"\n")

MARKER = %(marker)r
_main()
""".replace("%(marker)r", repr(NETWORK_MARKER))


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0  # wall-clock seconds before the whole process group is killed
    cpu_s: int = 10  # CPU seconds (RLIMIT_CPU)
    memory_mb: int = 1024  # address space (RLIMIT_AS); the interpreter itself needs ~50 MB
    output_bytes: int = 1 << 20  # cap on stdout, on stderr and on any file the program writes
    disk_bytes: int = 32 << 20  # cap on all the files the program writes together (a tmpfs; memory)


@dataclasses.dataclass(frozen=True)
class Result:
    passed: bool  # ran to its end (nonce seen) with exit status 0
    reason: str | None  # None when passed; else timeout|memory|output|disk|network|processes|wrong|crash|early_exit
    returncode: int
    stdout: str
    stderr: str
    wall_s: float


def _execute(source: str, limits: Limits, layers: int, nonce: bytes, probe: bool = False):
    """Spawn the bootstrap on `source`; returns (rc, timed_out, stdout, stdout_full, stderr, stderr_full)."""
    tmp = tempfile.mkdtemp(prefix="zenjax-sandbox-")
    try:
        work = os.path.join(tmp, "work")
        os.mkdir(work)
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
            f.write(source)
        r, w = os.pipe()
        os.write(w, nonce)
        os.close(w)
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        args = [sys.executable, "-I", "-c", _BOOTSTRAP, str(r), str(layers), str(int(probe)),
                str(max(1, int(limits.cpu_s))), str(limits.memory_mb << 20), str(limits.output_bytes),
                str(limits.disk_bytes)]
        env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(args, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        pass_fds=(r,), start_new_session=True)
            finally:
                os.close(r)
            timed_out = False
            try:
                rc = proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _killpg(proc.pid)
                rc = proc.wait()
            _killpg(proc.pid)  # anything left in the group (only possible where seccomp is unavailable)
        stdout, out_full = _read_capped(out_path, limits.output_bytes)
        stderr, err_full = _read_capped(err_path, limits.output_bytes)
        return rc, timed_out, stdout, out_full, stderr, err_full
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(path: str, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    return data[:cap].decode("utf-8", errors="replace"), len(data) >= cap


@functools.cache
def _layers() -> int:
    """Probe once which isolation layers this machine allows; warn about each one missing."""
    all_layers = sum(LAYERS.values())
    rc, _, stdout, _, stderr, _ = _execute("", Limits(wall_s=30), all_layers, b"probe", probe=True)
    first = stdout.split("\n", 1)[0].strip()
    if rc != 0 or not first.isdigit():
        raise RuntimeError(f"sandbox: the isolation probe failed (exit {rc}): {stderr[-2000:]}")
    got = int(first)
    for name, bit in LAYERS.items():
        if not got & bit:
            log.warning("sandbox: isolation layer %r is not available on this machine; running without it", name)
    return got


def isolation() -> dict[str, bool]:
    """Which isolation layers are in effect here: network, filesystem, capabilities, processes."""
    got = _layers()
    return {name: bool(got & bit) for name, bit in LAYERS.items()}


_LAST_EXC = re.compile(r"^(\w+(?:\.\w+)*)(?::|$)", re.M)


def _classify(rc: int, timed_out: bool, out_full: bool, err_full: bool, stderr: str) -> str:
    # A SIGKILL we did not send comes from the hard CPU limit (RLIMIT_AS keeps the OOM killer away).
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    if NETWORK_MARKER in stderr or "Network is unreachable" in stderr or "gaierror" in stderr:
        return "network"
    if rc == -signal.SIGXFSZ or out_full or err_full:
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


def run_python(source: str, limits: Limits = Limits()) -> Result:
    """Run `source` as a Python program under `limits`; never raises for anything the program does."""
    layers = _layers()
    nonce = secrets.token_hex(16).encode()
    start = time.monotonic()
    rc, timed_out, stdout, out_full, stderr, err_full = _execute(source, limits, layers, nonce)
    token = "\n" + nonce.decode() + "\n"
    passed = rc == 0 and not timed_out and stdout.endswith(token)
    if passed:
        stdout = stdout[: -len(token)]
    reason = None if passed else _classify(rc, timed_out, out_full, err_full, stderr)
    return Result(passed, reason, rc, stdout, stderr, time.monotonic() - start)


def run_many(sources: list[str], limits: Limits = Limits(), max_workers: int | None = None) -> list[Result]:
    """`run_python` over many programs on a bounded thread pool (the threads only wait on subprocesses)."""
    _layers()  # probe before the threads start, once
    workers = max(1, min(max_workers or os.cpu_count() or 1, len(sources) or 1))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as ex:
        return list(ex.map(lambda s: run_python(s, limits), sources))
