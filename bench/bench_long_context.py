"""Per-chip memory of the GSPO update as sequences grow, compiled for TPU from this host (python -m zenjax.compile).

    python bench/bench_long_context.py [--lengths=2048,8192,16384,32768] [--which=nano,next]

nano: 4 sequences per chip on v5p-8; next: one sequence per chip on v5p-128. Prompts are 512 tokens, the rest
completion. Prints arguments, temporaries and their sum per chip, and the compile time, for each length.
"""
import argparse
import subprocess
import sys
import json

RUNS = {  # config, slice, overrides giving the rows per minibatch
    "nano": ("configs/nano.py", "v5p-8", ["--config.rl.prompts_per_step=8", "--config.rl.group_size=2",
                                         "--config.rl.minibatches=1"]),
    "next": ("configs/next.py", "v5p-128", ["--config.rl.prompts_per_step=8", "--config.rl.group_size=8",
                                           "--config.rl.minibatches=1"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,8192,16384,32768")
    ap.add_argument("--which", default="nano,next")
    args = ap.parse_args()
    print(f"{'run':<6} {'T':>6} {'args GB':>8} {'temps GB':>9} {'sum GB':>7} {'compile s':>9}")
    for name in args.which.split(","):
        config, slice_name, overrides = RUNS[name]
        for T in map(int, args.lengths.split(",")):
            cmd = [sys.executable, "-m", "zenjax.compile", f"--config={config}", f"--topology={slice_name}",
                   "--programs=update", "--json", "--config.data.max_prompt_len=512",
                   f"--config.rl.max_new_tokens={T - 512}", f"--config.model.max_position_embeddings={max(T, 40960)}",
                   *overrides]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if not out.stdout.strip():
                print(f"{name:<6} {T:>6} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            (r,) = json.loads(out.stdout)["programs"]
            b = r["bytes"]
            print(f"{name:<6} {T:>6} {b['arguments'] / 1e9:>8.1f} {b['temporaries'] / 1e9:>9.1f} "
                  f"{(b['arguments'] + b['temporaries']) / 1e9:>7.1f} {r['compile_s']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
