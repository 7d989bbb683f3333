"""python -m convert {hf-to-orbax, orbax-to-hf, inspect}: see README "Converting weights"."""
from __future__ import annotations

import argparse
import os
import sys

# Converting needs no accelerator; on a TPU/GPU host it must not grab the chips a training job may hold.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert", description="Convert Qwen3, Qwen3-MoE, Qwen3-Next and "
                                "Qwen3-Omni-MoE thinker weights between HF and zenjax.")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="HF safetensors dir -> zenjax weights dir (config.json + params/)")
    a.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    a.add_argument("--out", required=True, help="weights dir to create (must not exist, or be empty)")
    a.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="stored dtype (default: the source's)")
    a.add_argument("--mesh", help="chunk each array as one device's shard on this mesh, e.g. data=1,fsdp=4,tensor=2")
    b = sub.add_parser("orbax-to-hf", help="weights dir or training workdir (latest step) -> HF safetensors dir")
    b.add_argument("--orbax", required=True, help="weights dir, or training workdir (config.json + checkpoints/)")
    b.add_argument("--out", required=True, help="HF dir to create (must not exist, or be empty)")
    b.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="output dtype (default: as stored)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    c = sub.add_parser("inspect", help="print the config, tensors, parameter count of a checkpoint")
    c.add_argument("path", help="HF dir, weights dir or training workdir")
    args = p.parse_args(argv)

    from convert.common import parse_dtype, parse_mesh, parse_size  # noqa: PLC0415 - after JAX_PLATFORMS

    try:
        if args.command == "hf-to-orbax":
            from convert.hf_to_orbax import hf_to_orbax  # noqa: PLC0415

            out = hf_to_orbax(args.hf, args.out, dtype=parse_dtype(args.dtype), mesh_shape=parse_mesh(args.mesh))
            print(f"wrote {out}")
        elif args.command == "orbax-to-hf":
            from convert.orbax_to_hf import orbax_to_hf  # noqa: PLC0415

            out = orbax_to_hf(args.orbax, args.out, dtype=parse_dtype(args.dtype),
                              max_shard_size=parse_size(args.max_shard_size))
            print(f"wrote {out}")
        else:
            from convert.describe import describe  # noqa: PLC0415

            print(describe(args.path))
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # a user error (bad path, missing tensor, unsupported config), as the trainer's
    return 0


if __name__ == "__main__":
    from zenjax import hostmem  # noqa: PLC0415 - after JAX_PLATFORMS is set

    hostmem.reexec_with_huge_pages()
    sys.exit(main())
