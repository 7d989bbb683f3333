"""The code sandbox against programs that misbehave in every way a completion might, hostile ones included."""

import glob
import os
import resource
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings

import pytest

from zenjax.rl import rewards, sandbox
from zenjax.rl.sandbox import Limits, run_many, run_python

# Programs that should end by themselves get room (the machine may be busy); those that should be stopped get
# a short wall clock so the tests stay quick.
ROOMY = Limits(wall_s=20, cpu_s=10, memory_mb=256, output_bytes=1 << 16)
SHORT = Limits(wall_s=1.5, cpu_s=1, memory_mb=256, output_bytes=1 << 16)
LAYERS = sandbox.isolation()
ME = os.getpid()
if not all(LAYERS.values()):  # shown in the summary even with -q: which tests this host skips, and why
    warnings.warn(f"this host lacks the sandbox layers {[n for n, on in LAYERS.items() if not on]}: the tests that "
                  "need them are skipped")


def needs(*layers):
    missing = [name for name in layers if not LAYERS[name]]
    return pytest.mark.skipif(bool(missing), reason=f"this host lacks the isolation layers {missing}")


def sandbox_processes(parent: int = ME) -> list[int]:
    """Supervisors `parent` started and their programs (forks of them: the same command line, parent's pid in it)."""
    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            args = open(cmdline, "rb").read().split(b"\0")
        except OSError:
            continue
        if b"def _child(" in b"".join(args) and str(parent).encode() in args:
            found.append(int(cmdline.split("/")[2]))
    return found


def gone(parent: int = ME, deadline_s: float = 3.0) -> bool:
    end = time.monotonic() + deadline_s
    while sandbox_processes(parent):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(autouse=True)
def trainer_unharmed():
    """After each test: nothing of the sandbox left running or on disk, and this process untouched."""
    rlimits = [resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE,
                                               resource.RLIMIT_NOFILE)]
    cwd, left_before = os.getcwd(), set(glob.glob("/tmp/zenjax-sandbox-*"))
    yield
    assert gone(), sandbox_processes()
    assert set(glob.glob("/tmp/zenjax-sandbox-*")) == left_before
    assert [resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE,
                                            resource.RLIMIT_NOFILE)] == rlimits
    assert os.getcwd() == cwd
    assert subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout == "42\n"


def test_values_come_back_as_plain_data():
    src = "def f(x):\n    return x * 2\nprint('side output')\nopen('scratch.txt', 'w').write('x')\n"
    r = run_python(src, ROOMY, calls=("f(21)", "f((1,))", "{f(1): {1.5, None}}", "f(None)", "b'x' + bytes(1)"))
    assert r.passed and r.stdout == "side output\n"
    assert r.values == [("ok", 42), ("ok", (1, 1)), ("ok", {2: {1.5, None}}), ("error", "TypeError"),
                        ("ok", b"x\0")]
    assert type(r.values[1][1]) is tuple  # a tuple is not a list: `f(x) == (1, 1)` keeps Python's meaning
    # Only plain data crosses: an object (whatever its __eq__) or a subclass of a plain type is an error.
    r = run_python("class T(int):\n    __eq__ = lambda s, o: True\nclass A:\n    __eq__ = lambda s, o: True\n",
                   ROOMY, calls=("T(1)", "A()", "[A()]"))
    assert r.passed and [v[0] for v in r.values] == ["error"] * 3
    bad = run_python("def f(:\n", ROOMY, calls=("f(1)",))
    assert bad.reason == "crash" and "SyntaxError" in bad.stderr and bad.values == []


def test_decode_accepts_only_what_the_sandbox_writes():
    assert sandbox.decode({"tuple": [1, {"set": ["a"]}]}) == (1, {"a"})
    assert sandbox.decode({"float": "nan"}) != sandbox.decode({"float": "nan"})  # a NaN, as the program had
    for bad in ({"a": 1}, {"tuple": 1}, {"dict": [[[], 1]]}, {"float": "1e5"}, {"bytes": "zz"}, {"tuple": [], "x": 1}):
        with pytest.raises(ValueError):
            sandbox.decode(bad)


def test_early_exit_and_forged_answers_are_not_a_pass():
    for src in ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"]:
        r = run_python(src, ROOMY, calls=("1",))
        assert not r.passed and r.reason == "early_exit" and r.returncode == 0
    # Answers written to every descriptor without running the calls count as what f() returned, no more: the
    # trainer still compares them with expected values the program never saw (test_rewards' hacks).
    forge = ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'R[[\"ok\", 1]]')\n"
             "    except OSError:\n        pass\nos._exit(0)\n")
    assert run_python(forge, ROOMY, calls=("f()",)).values == [("ok", 1)]
    r = run_python(forge.replace("1]]", "{}]]"), ROOMY, calls=("f()",))  # not data the sandbox writes
    assert not r.passed and r.reason == "bad_values"


def test_timeouts_cpu_memory_and_output():
    cases = [("while True:\n    pass\n", SHORT, "timeout"), ("import time\ntime.sleep(60)\n", SHORT, "timeout"),
             ("import signal\nsignal.signal(signal.SIGXCPU, lambda *a: None)\nwhile True:\n    pass\n",
              Limits(wall_s=20, cpu_s=1), "timeout"),  # the hard CPU limit, a second after the soft one
             ("x = bytearray(10 ** 10)\n", ROOMY, "memory"),
             ("a = []\nwhile True:\n    a.append(bytearray(10 ** 7))\n", ROOMY, "memory"),
             ("while True:\n    print('x' * 1000)\n", ROOMY, "output"),
             ("import sys\nwhile True:\n    sys.stderr.write('y' * 1000)\n", ROOMY, "output")]
    results = [None] * len(cases)

    def go(i):
        src, limits, _ = cases[i]
        results[i] = run_python(src, limits)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(cases))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for (src, limits, want), r in zip(cases, results):
        assert r.reason == want, (src, r.stderr[-300:])
        assert len(r.stdout) <= limits.output_bytes and len(r.stderr) <= limits.output_bytes
        if limits is SHORT:
            assert r.wall_s < SHORT.wall_s + 1.5


@needs("syscalls")
def test_fork_bomb_and_exec():
    # Only ever run with the seccomp layer in place: without it this would take the machine down.
    results = run_many(["import os\nwhile True:\n    os.fork()\n", "import subprocess\nsubprocess.run(['true'])\n",
                        "import os\nos.execv('/bin/true', ['true'])\n",
                        "import os\nwhile True:\n    try:\n        os.setsid(); os.fork()\n    except OSError:\n"
                        "        pass\n"], SHORT, max_workers=4)
    assert [r.reason for r in results] == ["processes", "processes", "crash", "timeout"]
    assert "PermissionError" in results[2].stderr


# Each escape the issue reproduced; every program must fail with PermissionError (or the stated error) and the
# trainer must be untouched (the fixture), and signals / limits must not reach this process or a bystander.
ESCAPES = {
    "F_SETOWN + F_SETSIG + O_ASYNC to the trainer": """
        import fcntl, os, signal
        r, w = os.pipe()
        fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)
        fcntl.fcntl(r, fcntl.F_SETOWN, {me})
        """,
    "F_SETSIG": "import fcntl, os\nr, w = os.pipe()\nfcntl.fcntl(r, 10, 9)\n",
    "F_SETOWN_EX": "import fcntl, os, struct\nr, w = os.pipe()\nfcntl.fcntl(r, 15, struct.pack('ii', 1, {me}))\n",
    "FIOSETOWN ioctl": "import fcntl, os, struct\nr, w = os.pipe()\nfcntl.ioctl(r, 0x8901, struct.pack('i', {me}))\n",
    "prlimit of the trainer": "import resource\nresource.prlimit({me}, resource.RLIMIT_NOFILE, (1, 1))\n",
    "prlimit of a bystander": "import resource\nresource.prlimit({victim}, resource.RLIMIT_CPU, (1, 1))\n",
    "kill a bystander": "import os\nos.kill({victim}, 9)\n",
    "unix socket through ctypes": """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.socket(1, 1, 0) == -1 and ctypes.get_errno() == errno.EPERM
        raise PermissionError('refused')
        """,
    "unix socket to the host daemon": "import socket\nsocket.socket(socket.AF_UNIX).connect({sock!r})\n",
    "unshare(CLONE_NEWUSER)": """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.unshare(0x10000000) == -1 and ctypes.get_errno() == errno.EPERM
        assert libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0) == -1  # clone(CLONE_NEWUSER | SIGCHLD)
        raise PermissionError('refused')
        """,
    "a device node on a host mount": "open({node!r}, 'wb').write(b'x')\n",
    "a new device node": "import os\nos.mknod('loop0', 0o600 | 0o60000, os.makedev(7, 0))\n",
    "memfd_create": "import os\nos.memfd_create('x')\n",
    "SysV shared memory": """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.shmget(0, 1 << 30, 0o1000 | 0o600) == -1 and ctypes.get_errno() == errno.EPERM
        raise PermissionError('refused')
        """,
    "io_uring (bypasses seccomp)": """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.syscall(425, 8, ctypes.create_string_buffer(120)) == -1 and ctypes.get_errno() == errno.EPERM
        raise PermissionError('refused')
        """,
    "ptrace": """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.ptrace(16, 1, 0, 0) == -1 and ctypes.get_errno() == errno.EPERM  # PTRACE_ATTACH
        raise PermissionError('refused')
        """,
}


@needs(*sandbox.LAYERS)
def test_escapes_are_refused(tmp_path):
    victim = subprocess.Popen(["sleep", "30"])
    # In a host directory the sandbox shows: the base interpreter's (a virtualenv may sit in /tmp, the program's own)
    sock_dir = tempfile.mkdtemp(dir=sys.base_prefix)
    listener = socket.socket(socket.AF_UNIX)
    try:
        sock, node = os.path.join(sock_dir, "daemon.sock"), os.path.join(sock_dir, "null")
        listener.bind(sock)
        listener.listen()
        listener.setblocking(False)
        os.mknod(node, 0o666 | 0o20000, os.makedev(1, 3))  # a character device anyone may write: /dev/null's
        for path in (sock_dir, sock, node):
            os.chmod(path, 0o777)  # open to the sandbox's uid: only the sandbox's layers stand in the way
        names = list(ESCAPES)
        sources = [textwrap.dedent(ESCAPES[n]).format(me=ME, victim=victim.pid, sock=sock, node=node) for n in names]
        results = run_many(sources, ROOMY, max_workers=8)
        for name, r in zip(names, results):
            assert not r.passed and "PermissionError" in r.stderr, (name, r.reason, r.stderr[-400:])
        assert victim.poll() is None
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()
        victim.kill()
        victim.wait()
        for name in os.listdir(sock_dir):
            os.remove(os.path.join(sock_dir, name))
        os.rmdir(sock_dir)


@needs(*sandbox.LAYERS)
def test_what_the_program_sees():
    src = textwrap.dedent("""
        import os, socket
        status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())
        assert all(int(status[k], 16) == 0 for k in ('CapEff', 'CapPrm', 'CapBnd', 'CapAmb', 'CapInh'))
        assert status['NoNewPrivs'].strip() == '1' and status['Seccomp'].strip() == '2'
        assert os.getuid() == os.geteuid() == os.getgid() == 65534 and os.getgroups() == []
        assert os.getpid() == 1 and [p for p in os.listdir('/proc') if p.isdigit()] == ['1']  # its own PID namespace
        assert sorted(os.listdir('/dev')) == ['null', 'random', 'urandom', 'zero']
        try:
            os.listdir('/run')  # a private tmpfs, closed to the program: no host daemon's socket
            raise AssertionError('/run')
        except PermissionError:
            pass
        assert os.getcwd() == '/tmp' and os.listdir('.') == []  # a fresh tmpfs: no host /tmp, no sockets
        assert not os.path.exists({this!r})  # this test file: the host's code and data are out of sight
        assert [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]] == ['lo']
        for path in ('/etc/passwd', '/usr/x'):  # the host's files read-only
            try:
                open(path, 'a')
                raise AssertionError(path)
            except OSError as e:
                assert e.errno in (30, 13), e  # EROFS, EACCES
        a, b = socket.socketpair()  # anonymous pairs stay (asyncio needs them)
        a.send(b'x')
        assert b.recv(1) == b'x'
        """).format(this=os.path.abspath(__file__))
    r = run_python(src, ROOMY)
    assert r.passed, r.stderr[-600:]


def test_network_attempts_fail():
    results = run_many(["import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n",
                        "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1).read()\n",
                        "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n"], ROOMY)
    assert [r.reason for r in results] == ["network"] * 3, [r.stderr[-300:] for r in results]


@needs("pids", "syscalls")
def test_a_trainer_killed_with_sigkill_takes_its_programs_along():
    # A "trainer" scoring a sleeper is SIGKILLed: the supervisor and the program die with it at once, and the
    # sandbox's files were only ever on a tmpfs of its own mount namespace.
    trainer = subprocess.Popen([sys.executable, "-c", "from zenjax.rl import sandbox\nsandbox.run_python("
                                "'import time\\ntime.sleep(60)\\n', sandbox.Limits(wall_s=60))"],
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    end = time.monotonic() + 60
    while len(sandbox_processes(trainer.pid)) < 2:  # its supervisor and the program (as uid 65534) run
        assert time.monotonic() < end and trainer.poll() is None
        time.sleep(0.05)
    trainer.kill()
    trainer.wait()
    assert gone(trainer.pid)


QUOTA = Limits(wall_s=10, cpu_s=5, memory_mb=256, output_bytes=1 << 20, disk_bytes=8 << 20)


@needs("filesystem")
def test_disk_quota_bytes_and_files():
    results = run_many(["i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 2**20)\n    i += 1\n",
                        "i = 0\nwhile True:\n    open(f'e{i}', 'w').close()\n    i += 1\n",  # no bytes, but inodes
                        "open('cache.txt', 'w').write('42')\nassert open('cache.txt').read() == '42'\n"], QUOTA)
    assert [r.reason for r in results] == ["disk", "disk", None], [r.stderr[-300:] for r in results]


def test_many_programs_in_parallel():
    src = "import time\ntime.sleep(0.3)\nassert sum(range(10)) == 45\n"
    t = time.perf_counter()
    assert run_python(src, ROOMY).passed
    single = time.perf_counter() - t
    t = time.perf_counter()
    results = run_many([src] * 31 + ["assert False\n"], ROOMY, max_workers=16)
    total = time.perf_counter() - t
    assert [r.passed for r in results] == [True] * 31 + [False]
    assert total < 32 * single / 4  # serial execution would take ~32x


def test_require_refuses_missing_layers_unless_allowed(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_layers", lambda: sum(sandbox.LAYERS.values()) - sandbox.LAYERS["user"])
    with pytest.raises(RuntimeError, match=r"layers \['user'\] are not available.*allow_missing='user'"):
        sandbox.require("")
    sandbox.require("user")
    sandbox.require("all")
    assert "without the isolation layer 'user'" in caplog.text


def test_deadline_bounds_a_step_of_sleepers():
    # 64 sleeping completions, 2 s per-step deadline: scoring ends within the deadline plus one program's wall
    # limit (5 s), however few the workers, every sleeper scores 0 "timeout", and none is left running (fixture).
    sleeper = "```python\nimport time\ntime.sleep(60)\ndef f():\n    return 1\n```"
    t = time.perf_counter()
    r, info = rewards.score([sleeper] * 64, [{"tests": "assert f() == 1"}] * 64, {"code": 1.0},
                            options={"code": {"deadline_s": 2.0, "wall_s": 5.0, "workers": 4}})
    elapsed = time.perf_counter() - t
    assert elapsed < 2.0 + 5.0, elapsed
    assert r.max() == 0 and info["code/fail/timeout"] == 64
