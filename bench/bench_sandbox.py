"""Code-reward throughput: honest completions scored per second through `rewards.score`, one worker and a pool.

    python -m bench.bench_sandbox [--n=64] [--workers=0]

Each completion defines a function and the item's tests are three asserts on it (the usual MBPP shape), so the
figure is the sandbox's per-program cost plus a few milliseconds of interpreter work.
"""
import argparse
import inspect
import os
import resource
import time

from zenjax.rl import rewards

COMPLETION = "```python\nimport math\n\ndef hyp(a, b):\n    return math.sqrt(a * a + b * b)\n```"
TESTS = ["assert hyp(3, 4) == 5.0", "assert hyp(5, 12) == 13.0", "assert hyp(0, 0) == 0.0"]


def rate(n: int, workers: int) -> tuple[float, float]:
    """Completions per second, and the CPU seconds (sandbox processes' user + system) they took."""
    # The option's name differs before and after issue #30 (max_workers -> workers).
    key = "workers" if "workers" in inspect.signature(rewards.code_reward).parameters else "max_workers"
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r, info = rewards.score([COMPLETION] * n, [{"tests": TESTS}] * n, {"code": 1.0}, options={"code": {key: workers}})
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert r.min() == 1.0, info
    return n / dt, after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="pool size for the parallel figure (0: the cores)")
    a = p.parse_args()
    workers = a.workers or os.cpu_count()
    rate(2, 1)  # warm-up: the isolation probe and the page cache
    print(f"code reward, honest completions, {os.cpu_count()} cores")
    single, _ = rate(max(a.n // 4, 4), 1)
    print(f"  single (1 worker):      {single:7.1f} completions/s")
    parallel, cpu_s = rate(a.n, workers)
    print(f"  parallel ({workers} workers): {parallel:7.1f} completions/s  ({a.n} completions: {a.n / parallel:.2f} s "
          f"wall, {cpu_s:.2f} CPU s = {cpu_s / min(workers, os.cpu_count()):.2f} s on {min(workers, os.cpu_count())} "
          "cores)")


if __name__ == "__main__":
    main()
