"""Host memory for XLA:CPU (Linux, glibc): huge pages, and freed memory kept in the process.

XLA:CPU mallocs each execution's temporaries and frees them afterwards (1.4 GB per step for the foundation
benchmark's train step). glibc serves such sizes with a fresh mmap every time, so each step first-touches them
page by page: ~330k page faults, a sixth of a CPU train step. With glibc's `glibc.malloc.hugetlb=1` tunable,
malloc asks for transparent huge pages (kernel THP mode `madvise`): 512x fewer faults, and fewer TLB misses when
decoding streams the weights. glibc reads tunables once, at start-up, hence the re-execution.

`keep_freed_memory` goes further for the RL loop, whose phases alternate: see there. Both apply only to runs
whose devices are CPUs: TPU VMs and GPU nodes keep malloc's defaults and are never re-executed.
"""
from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
# Device files of accelerators JAX would use: TPU chips (v4/v5e: accel, v5p/v6e: vfio), NVIDIA and AMD GPUs.
ACCELERATORS = ("accel[0-9]*", "vfio/[0-9]*", "nvidia[0-9]*", "kfd")


def runs_on_cpu(platforms: str | None, dev: str = "/dev") -> bool:
    """Whether JAX will run this process on CPUs: `platforms` (JAX_PLATFORMS) names cpu first, or it is unset
    and the host has no accelerator. Decided before JAX starts, as the tuning must be."""
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(os.path.join(dev, pattern)) for pattern in ACCELERATORS)


def tunables_with_huge_pages(current: str | None, thp_mode: str, libc: tuple[str, str]) -> str | None:
    """The GLIBC_TUNABLES value that turns huge pages on, or None when nothing is to change: not glibc >= 2.35
    (the first with the tunable), THP not in `madvise` mode (`always` needs no hint, `never` ignores it), or the
    tunable already set (by us or by the user, who may set it to 0 to opt out)."""
    name, version = libc
    if name != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
        return None
    if "[madvise]" not in thp_mode or TUNABLE in (current or ""):
        return None
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def reexec_with_huge_pages() -> None:
    """Re-execute this process (same command line, same pid) with huge-page malloc, where it helps. Entry points
    call it first thing, before any work: state built before it is lost."""
    if not runs_on_cpu(os.environ.get("JAX_PLATFORMS")):
        return
    try:
        with open(THP_MODE) as f:
            thp_mode = f.read()
    except OSError:
        return
    value = tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES"), thp_mode, platform.libc_ver())
    if value is None:
        return
    os.environ["GLIBC_TUNABLES"] = value
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from malloc.h


def keep_freed_memory() -> None:
    """On the CPU backend, keep the memory XLA frees for the next execution instead of returning it to the kernel.

    Between two policy updates the RL loop samples for seconds. Meanwhile the update's 1.3 GB of temporaries
    (MoE benchmark model) lie free in the kernel, and a virtual machine's kernel hands free memory back to the
    hypervisor after a second or two (free page reporting); touching it again then costs a hypervisor fault per
    page: 1.8 s of system time, 0.9 s more for the first update after sampling. So:
    - executions run on the calling thread (`jax_cpu_enable_async_dispatch` off; the loop waits for each result
      anyway), so that their buffers come from the main thread's malloc arena: the other arenas mmap every
      block over 64 MB whatever the settings;
    - that arena serves large blocks from its heap (M_MMAP_MAX 0) and never shrinks it (M_TRIM_THRESHOLD -1),
      so the process keeps its peak and reuses it.
    Call it before the first computation (the dispatch mode is fixed when the CPU client starts) and after
    `jax.distributed.initialize`. Accelerator runs keep malloc's defaults."""
    import jax  # noqa: PLC0415 - not before the re-execution, which would import it twice

    if not runs_on_cpu(jax.config.jax_platforms):
        return
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, -1)
