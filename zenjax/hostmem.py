"""Host memory: back large malloc allocations with transparent huge pages (Linux, glibc).

XLA:CPU mallocs each execution's temporaries and frees them afterwards (1.4 GB per step for the foundation
benchmark's train step). glibc serves such sizes with a fresh mmap every time, so each step first-touches them
page by page: ~330k page faults, a sixth of a CPU train step. With glibc's `glibc.malloc.hugetlb=1` tunable,
malloc asks for transparent huge pages (kernel THP mode `madvise`): 512x fewer faults, and fewer TLB misses when
decoding streams the weights. glibc reads tunables once, at start-up, hence the re-execution.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


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
