import os
import platform
import subprocess
import sys

import pytest

from zenjax import hostmem

GLIBC = ("glibc", "2.36")
MADVISE = "always [madvise] never\n"


def test_tunable_added_for_glibc_with_thp_on_request():
    assert hostmem.tunables_with_huge_pages(None, MADVISE, GLIBC) == "glibc.malloc.hugetlb=1"
    assert hostmem.tunables_with_huge_pages("glibc.malloc.arena_max=2", MADVISE, GLIBC) == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_nothing_to_change():
    assert hostmem.tunables_with_huge_pages("glibc.malloc.hugetlb=0", MADVISE, GLIBC) is None  # user opted out
    assert hostmem.tunables_with_huge_pages(None, "[always] madvise never\n", GLIBC) is None
    assert hostmem.tunables_with_huge_pages(None, "always madvise [never]\n", GLIBC) is None
    assert hostmem.tunables_with_huge_pages(None, MADVISE, ("glibc", "2.31")) is None  # before the tunable
    assert hostmem.tunables_with_huge_pages(None, MADVISE, ("", "")) is None  # musl, macOS


@pytest.mark.parametrize("files, platforms, cpu", [
    ((), None, True), (("accel0",), None, False), (("vfio/0", "vfio/vfio"), None, False), (("nvidia0",), None, False),
    (("kfd",), None, False), (("vfio/vfio",), None, True),  # the VFIO control file alone is no TPU
    (("accel0",), "cpu", True), ((), "tpu,cpu", False), ((), "cuda", False)])
def test_cpu_tuning_only_where_jax_runs_on_cpus(tmp_path, files, platforms, cpu):
    for name in files:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    assert hostmem.runs_on_cpu(platforms, dev=str(tmp_path)) is cpu


def test_no_reexec_on_accelerator_hosts(monkeypatch):
    monkeypatch.setattr(hostmem, "runs_on_cpu", lambda platforms: False)
    monkeypatch.setattr(hostmem, "tunables_with_huge_pages", lambda *a: "glibc.malloc.hugetlb=1")
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("re-executed on an accelerator host"))
    hostmem.reexec_with_huge_pages()


def test_reexec_keeps_the_command_line_and_runs_once():
    script = ("import os, sys; from zenjax import hostmem; print('start', flush=True); "
              "hostmem.reexec_with_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", script, "a", "--b=1"], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    try:
        with open(hostmem.THP_MODE) as f:
            thp_mode = f.read()
    except OSError:
        thp_mode = ""
    expected = hostmem.tunables_with_huge_pages(None, thp_mode, platform.libc_ver())
    assert out == ["start"] * (1 + (expected is not None)) + [f"{expected} ['a', '--b=1']"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc settings of glibc")
def test_freed_temporaries_stay_in_the_process():
    # A 64 MB intermediate: with the defaults glibc returns it to the kernel when the execution ends; kept, the
    # process's resident memory still holds it.
    script = ("import sys, jax, jax.numpy as jnp; from zenjax import hostmem\n"
              "if sys.argv[1] == 'keep': hostmem.keep_freed_memory()\n"
              "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
              "x = jnp.ones((4096, 4096)); run = jax.jit(lambda x: ((x @ x) @ x).sum()).lower(x).compile()\n"
              "before = rss(); run(x).block_until_ready(); print(rss() - before)")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    grew = {mode: int(subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True,
                                     check=True).stdout) for mode in ("keep", "default")}
    assert grew["keep"] >= 60 and grew["default"] < 32, grew
