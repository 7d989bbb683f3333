"""Conversion throughput and peak memory on a ~1 GB random Qwen3-shaped checkpoint (not a test).

    python bench/bench_convert.py [--model dense|moe|both] [--dir /tmp/zenjax-bench]

For each model: writes a random bf16 HF checkpoint (500 MB files), measures the disk's sequential read speed with
dd (O_DIRECT, median of 3) and the speed of a plain durable copy of the files (dd, fsynced), then runs hf-to-orbax
and orbax-to-hf each in a fresh child process and reports the conversion's seconds and MB/s (source bytes / time
inside the conversion, and with interpreter start-up), and the child's peak RSS against the largest tensor group
(a layer's tensors, experts included, or the embedding) and the baseline RSS of a child that imports everything
and plans the conversion without reading tensors (`python -m convert inspect`).
Targets: peak RSS < 2x largest group + baseline; MB/s >= half of dd's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from convert.orbax_to_hf import SafetensorsWriter  # noqa: E402
from zenjax.models.hf import SAFETENSORS_DTYPES, entries, hf_shapes  # noqa: E402
from zenjax.models.qwen3 import Qwen3Config  # noqa: E402

MODELS = {
    # Qwen3-0.6B's shapes: 596M parameters, 1.19 GB in bf16; the tied embedding is the largest group.
    "dense": Qwen3Config(vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                         head_dim=128, intermediate_size=3072, tie_embeddings=True),
    # Qwen3-30B-A3B's layer shapes with 32 experts, 3 layers and a small vocabulary: 1.05 GB in bf16; one
    # layer's experts (32 x 2048 x 768 for each of gate, up, down) are the largest group.
    "moe": Qwen3Config(vocab_size=8192, hidden_size=2048, num_layers=3, num_heads=32, num_kv_heads=4,
                       head_dim=128, intermediate_size=6144, num_experts=32, num_experts_per_tok=8,
                       moe_intermediate_size=768, norm_topk_prob=True, tie_embeddings=False),
}
BF16 = SAFETENSORS_DTYPES["BF16"]


def make_checkpoint(cfg: Qwen3Config, directory: str) -> tuple[int, int, int]:
    """Random finite bf16 tensors; returns (total bytes, largest slice bytes, largest group bytes)."""
    os.makedirs(directory)
    shapes = hf_shapes(cfg)
    plan = [(k, shapes[k], BF16) for e in entries(cfg) for k in e.hf_keys]
    writer = SafetensorsWriter(directory, plan, max_shard_size=500 * 10**6)
    rng = np.random.default_rng(0)
    for key, shape, _ in plan:
        # Random bits with the top exponent bit cleared: finite values of magnitude < 2, generated at memory speed.
        bits = rng.integers(0, 1 << 16, int(np.prod(shape)), dtype=np.uint16) & np.uint16(0xBFFF)
        writer.write(key, bits.view(BF16).reshape(shape))
    writer.close()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)
    groups: dict = {}  # a layer's tensors together; each unstacked parameter on its own
    slices = []
    for e in entries(cfg):
        n = sum(int(np.prod(shapes[k])) * BF16.itemsize for k in e.hf_keys)
        slices.append(n)
        group = e.hf_keys[0] if e.layer is None else e.hf_keys[0].split(".mlp.")[0].split(".self_attn.")[0]
        groups[group] = groups.get(group, 0) + n
    return writer.total_size, max(slices), max(groups.values())


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def safetensors_files(directory: str) -> tuple[list[str], int]:
    """The checkpoint's safetensors files and their total size in bytes."""
    files = [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")]
    return files, sum(os.path.getsize(f) for f in files)


def dd_read_speed(directory: str, runs: int = 3) -> float:
    """MB/s of dd reading every safetensors file with O_DIRECT (no page cache): the median of `runs` reads, as
    this (virtual) disk's speed swings between runs."""
    files, total = safetensors_files(directory)
    speeds = []
    for _ in range(runs):
        t = time.perf_counter()
        for f in files:
            subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M", "iflag=direct"], check=True,
                           capture_output=True)
        speeds.append(total / (time.perf_counter() - t) / 1e6)
    return float(np.median(speeds))


def copy_speed(directory: str, scratch: str) -> float:
    """MB/s of dd copying every safetensors file, cold, through the page cache and fsynced: what a conversion
    that writes as many bytes as it reads, durably, could reach without any work between read and write."""
    files, total = safetensors_files(directory)
    os.makedirs(scratch)
    drop_caches()
    t = time.perf_counter()
    for i, f in enumerate(files):
        subprocess.run(["dd", f"if={f}", f"of={scratch}/{i}", "bs=16M", "conv=fsync"], check=True,
                       capture_output=True)
    speed = total / (time.perf_counter() - t) / 1e6
    shutil.rmtree(scratch)
    return speed


# The child's own high-water mark: unlike getrusage's ru_maxrss, VmHWM does not inherit the RSS that the
# forking parent had before exec.
HWM = ("int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024")


def run_child(code: str) -> tuple[dict, float]:
    """(the JSON the child printed last, with its peak RSS in MB as 'rss'; wall seconds) of `python -c code`."""
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", f"{code}\nimport json\nprint(json.dumps({{**out, 'rss': {HWM}}}))"],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if res.returncode:
        raise RuntimeError(f"child failed ({res.returncode}): {code}\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]), time.perf_counter() - t


def timed(call: str) -> str:
    """The conversion `call` as `python -m convert` runs it (re-executed with huge-page malloc), timed."""
    return (f"from zenjax import hostmem\nhostmem.reexec_with_huge_pages()\nimport time\n"
            f"from convert.hf_to_orbax import hf_to_orbax\nfrom convert.orbax_to_hf import "
            f"orbax_to_hf\nt = time.perf_counter()\n{call}\nout = {{'s': time.perf_counter() - t}}")


def bench(name: str, root: str) -> list[dict]:
    cfg = MODELS[name]
    work = os.path.join(root, name)
    shutil.rmtree(work, ignore_errors=True)
    hf, orbax, back = (os.path.join(work, d) for d in ("hf", "orbax", "back"))
    total, largest_slice, largest_group = make_checkpoint(cfg, hf)
    cold = drop_caches()
    dd = dd_read_speed(hf)
    cp = copy_speed(hf, os.path.join(work, "copy"))
    baseline = run_child(f"from convert.describe import describe\ndescribe({hf!r})\nout = {{}}")[0]["rss"]
    rows = []
    for direction, call in (("hf-to-orbax", f"hf_to_orbax({hf!r}, {orbax!r})"),
                            ("orbax-to-hf", f"orbax_to_hf({orbax!r}, {back!r})")):
        drop_caches()
        res, wall = run_child(timed(call))
        rows.append(dict(model=name, direction=direction, gb=total / 1e9, s=res["s"], wall=wall,
                         mbs=total / res["s"] / 1e6, mbs_wall=total / wall / 1e6, dd=dd, cp=cp, cold=cold,
                         rss=res["rss"], baseline=baseline, slice=largest_slice / 2**20, group=largest_group / 2**20))
    shutil.rmtree(work)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["dense", "moe", "both"], default="both")
    p.add_argument("--dir", default="/tmp/zenjax-bench")
    args = p.parse_args()
    rows = [r for m in (["dense", "moe"] if args.model == "both" else [args.model]) for r in bench(m, args.dir)]
    print(f"{'model':<6} {'direction':<12} {'GB':>5} {'s':>6} {'MB/s':>6} {'(wall)':>6} {'dd MB/s':>7} "
          f"{'cp MB/s':>7} {'peak RSS':>8} {'baseline':>8} {'slice':>7} {'group':>7} {'(RSS-base)/group':>16}")
    for r in rows:
        print(f"{r['model']:<6} {r['direction']:<12} {r['gb']:>5.2f} {r['s']:>6.2f} {r['mbs']:>6.0f} "
              f"{r['mbs_wall']:>6.0f} {r['dd']:>7.0f} {r['cp']:>7.0f} {r['rss']:>6.0f}MB {r['baseline']:>6.0f}MB "
              f"{r['slice']:>5.0f}MB {r['group']:>5.0f}MB {(r['rss'] - r['baseline']) / r['group']:>16.2f}")
    print("dd: O_DIRECT sequential read, median of 3; cp: dd copy of the same files, cold and fsynced "
          "(read + buffered write)")
    print("slice: the largest parameter slice converted at once (one layer's experts of gate, up or down); group:"
          " the largest layer (all its tensors) or unstacked parameter (the embedding); MB = MiB")
    print("page cache dropped before each run" if rows[0]["cold"] else "page cache NOT dropped (not permitted): "
          "reads may be served from memory")


if __name__ == "__main__":
    main()
