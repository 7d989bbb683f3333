"""The code sandbox against programs that misbehave in every way a completion might."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from zenjax.rl import sandbox
from zenjax.rl.sandbox import Limits, run_many, run_python

# Programs that should end by themselves get room (the machine may be busy); those that should be stopped get
# a short wall clock so the tests stay quick.
ROOMY = Limits(wall_s=20, cpu_s=10, memory_mb=256, output_bytes=1 << 16)
SHORT = Limits(wall_s=1.5, cpu_s=1, memory_mb=256, output_bytes=1 << 16)
LAYERS = sandbox.isolation()


def needs(layer):
    return pytest.mark.skipif(not LAYERS[layer], reason=f"isolation layer {layer!r} not available here")


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """Sandbox work dirs go to a fresh directory, so each test can check they were all removed."""
    root = tmp_path / "sandbox_tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    limits = [resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE)]
    cwd = os.getcwd()
    yield root
    assert list(root.iterdir()) == []  # every temporary directory was removed
    # The test process itself is untouched: same limits, same directory, can still start processes.
    assert [resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE)] == limits
    assert os.getcwd() == cwd
    assert subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout == "42\n"


def test_pass_and_fail():
    ok = run_python("def f(x):\n    return x * 2\nprint('side output')\nassert f(21) == 42\n", ROOMY)
    assert ok.passed and ok.reason is None and ok.returncode == 0 and ok.stdout == "side output\n"
    bad = run_python("def f(x):\n    return x * 3\nassert f(21) == 42\n", ROOMY)
    assert not bad.passed and bad.reason == "wrong" and "AssertionError" in bad.stderr
    syntax = run_python("def f(:\n", ROOMY)
    assert not syntax.passed and syntax.reason == "crash" and "SyntaxError" in syntax.stderr


def test_threads_and_scratch_files_are_allowed():
    src = """
import tempfile, threading
out = []
ts = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
assert sorted(out) == [0, 1, 2, 3]
open('scratch.txt', 'w').write('x')
with tempfile.TemporaryFile() as f:
    f.write(b'y')
"""
    assert run_python(src, ROOMY).passed


def test_early_exit_cannot_fake_a_pass():
    for src in ["import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\nassert False\n"]:
        r = run_python(src, ROOMY)
        assert not r.passed and r.reason == "early_exit" and r.returncode == 0
    # __main__ is the program's own module, not the bootstrap that holds the nonce.
    r = run_python("import __main__\nassert '_main' not in vars(__main__) and 'MARKER' not in vars(__main__)\n", ROOMY)
    assert r.passed


def test_infinite_loop_and_sleep_time_out():
    for src in ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"]:
        r = run_python(src, SHORT)
        assert not r.passed and r.reason == "timeout"
        assert r.wall_s < SHORT.wall_s + 1.0


def test_cpu_limit():
    # The CPU limit, not the wall clock, stops a busy loop; catching SIGXCPU only buys the one-second grace.
    for src in ["while True:\n    pass\n", "import signal\nsignal.signal(signal.SIGXCPU, lambda *a: None)\n"
                "while True:\n    pass\n"]:
        r = run_python(src, Limits(wall_s=20, cpu_s=1))
        assert r.reason == "timeout" and r.returncode in (-signal.SIGXCPU, -signal.SIGKILL)


def test_memory_bomb():
    for src in ["x = bytearray(10 ** 10)\n", "a = []\nwhile True:\n    a.append(bytearray(10 ** 7))\n"]:
        r = run_python(src, ROOMY)
        assert not r.passed and r.reason == "memory", r.stderr[-300:]


def test_huge_output_is_capped():
    for src in ["while True:\n    print('x' * 1000)\n", "import sys\nwhile True:\n    sys.stderr.write('y' * 1000)\n"]:
        r = run_python(src, ROOMY)
        assert not r.passed and r.reason == "output"
        assert len(r.stdout) <= ROOMY.output_bytes and len(r.stderr) <= ROOMY.output_bytes


@needs("processes")
def test_fork_bomb():
    # Only ever run with the seccomp layer in place: without it this would take the machine down.
    plain = run_python("import os\nwhile True:\n    os.fork()\n", ROOMY)
    assert not plain.passed and plain.reason == "processes"
    stubborn = run_python("import os\nwhile True:\n    try:\n        os.setsid(); os.fork()\n    except OSError:\n"
                          "        pass\n", SHORT)
    assert not stubborn.passed and stubborn.reason == "timeout"
    spawn = run_python("import subprocess\nsubprocess.run(['true'])\n", ROOMY)
    assert not spawn.passed and spawn.reason == "processes"


@needs("processes")
def test_cannot_signal_other_processes():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        # Signal 0 only checks permission, so a failure of the filter here harms nobody.
        for target in [victim.pid, -1, 1]:
            r = run_python(f"import os\nos.kill({target}, 0)\n", ROOMY)
            assert not r.passed and "PermissionError" in r.stderr, target
        assert run_python("import os, signal\nos.kill(os.getpid(), 0)\nos.kill(0, 0)\n", ROOMY).passed
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_network_attempts_fail():
    for src in ["import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n",
                "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1).read()\n",
                "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n"]:
        r = run_python(src, ROOMY)
        assert not r.passed and r.reason == "network", r.stderr[-300:]


@needs("network")
def test_network_namespace_has_only_loopback():
    # Below the audit hook: libc's connect() directly, and the interface list.
    src = ("import ctypes, socket, struct\nlibc = ctypes.CDLL(None, use_errno=True)\n"
           "fd = libc.socket(2, 1, 0)\naddr = struct.pack('HH4s8x', 2, socket.htons(80), bytes([1, 1, 1, 1]))\n"
           "assert libc.connect(fd, addr, 16) == -1 and ctypes.get_errno() == 101  # ENETUNREACH\n"
           "names = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]\n"
           "assert names == ['lo'], names\n")
    r = run_python(src, ROOMY)
    assert r.passed, r.stderr


@needs("filesystem")
def test_filesystem_is_read_only_outside_the_work_dir(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('x')\n", ROOMY)
    assert not r.passed and "Read-only file system" in r.stderr
    assert not target.exists()


@needs("capabilities")
def test_capabilities_dropped():
    src = "caps = dict(l.split(':') for l in open('/proc/self/status').read().splitlines() if l.startswith('Cap'))\n"
    src += "assert int(caps['CapEff'], 16) == 0 and int(caps['CapPrm'], 16) == 0 and int(caps['CapBnd'], 16) == 0\n"
    assert run_python(src, ROOMY).passed


def test_many_programs_in_parallel():
    src = "import time\ntime.sleep(0.3)\nassert sum(range(10)) == 45\n"
    t = time.perf_counter()
    assert run_python(src, ROOMY).passed
    single = time.perf_counter() - t
    t = time.perf_counter()
    results = run_many([src] * 63 + ["assert False\n"], ROOMY, max_workers=16)
    total = time.perf_counter() - t
    print(f"\nsandbox: one program {single:.2f}s, 64 programs on 16 workers {total:.2f}s")
    assert [r.passed for r in results] == [True] * 63 + [False]
    assert total < 64 * single / 4  # serial execution would take ~64x


LOOPING_WRITER = "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 2**20)\n    i += 1\n"
QUOTA = Limits(wall_s=10, cpu_s=5, memory_mb=256, output_bytes=1 << 20, disk_bytes=8 << 20)


@needs("disk")
def test_a_looping_writer_stops_at_the_disk_quota_and_the_host_disk_stays_free(private_tmp):
    # The host's free space, polled while a pool of writers runs: each may fill its quota, nothing more.
    # (Without the quota each wrote ~0.3 GB/s to the host until its CPU limit.)
    free = [shutil.disk_usage(private_tmp).free]
    done = threading.Event()

    def poll():
        while not done.is_set():
            free.append(shutil.disk_usage(private_tmp).free)
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        results = run_many([LOOPING_WRITER] * 4, QUOTA, max_workers=4)
    finally:
        done.set()
        poller.join()
    assert [r.reason for r in results] == ["disk"] * 4, [r.stderr[-300:] for r in results]
    slack = 64 << 20  # the rest of the test suite writes files meanwhile
    assert free[0] - min(free) <= 4 * QUOTA.disk_bytes + slack


@needs("disk")
def test_many_small_files_count_toward_the_quota():
    r = run_python("i = 0\nwhile True:\n    open(f's{i}', 'w').write('x')\n    i += 1\n", QUOTA)
    assert r.reason == "disk", r.stderr[-300:]
    empty = run_python("i = 0\nwhile True:\n    open(f'e{i}', 'w').close()\n    i += 1\n", QUOTA)
    assert empty.reason == "disk", empty.stderr[-300:]  # no bytes, but inodes


def test_a_solution_that_writes_a_small_file_still_passes():
    r = run_python("open('cache.txt', 'w').write('42')\nassert open('cache.txt').read() == '42'\n", QUOTA)
    assert r.passed, r.stderr
