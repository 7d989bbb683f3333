"""The one table of accelerator figures: what the planner sizes memory against and the compile tool bounds time by."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm: float  # HBM capacity in GiB, the unit XLA's limit counts in; XLA needs some of it for itself
    flops: float  # peak dense bf16 FLOP/s
    hbm_bw: float  # HBM bytes/s
    ici_bw: float  # interconnect bytes/s one chip sends: half the quoted bidirectional figure


# TPUs: cloud.google.com/tpu/docs/<chip> (ICI as bidirectional GB/s per chip, v4 as 2400 Gb/s each way).
CHIPS = {
    "v4": Chip(32, 275e12, 1200e9, 300e9),  # 275 TFLOP/s, 32 GiB at 1200 GB/s, ICI 2400 Gb/s each way
    "v5e": Chip(16, 197e12, 819e9, 200e9),  # 197 TFLOP/s, 16 GB at 819 GB/s, ICI 400 GB/s
    "v5p": Chip(95, 459e12, 2765e9, 600e9),  # 459 TFLOP/s, 95 GiB at 2765 GB/s, ICI 1200 GB/s
    "v6e": Chip(32, 918e12, 1638e9, 400e9),  # 918 TFLOP/s, 32 GB at 1638 GB/s, ICI 800 GB/s
    "a100": Chip(80, 312e12, 2039e9, 300e9),  # NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s, 2039 GB/s, NVLink 600 GB/s
    "h100": Chip(80, 989e12, 3350e9, 450e9),  # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense, 3.35 TB/s, NVLink 900 GB/s
    "h200": Chip(141, 989e12, 4800e9, 450e9),  # NVIDIA H200 SXM datasheet: 989 TFLOP/s dense, 4.8 TB/s, NVLink 900 GB/s
    "b200": Chip(180, 2250e12, 8000e9, 900e9),  # NVIDIA HGX B200 (per GPU): 2.25 PFLOP/s dense, 8 TB/s, NVLink 1.8 TB/s
}
