"""zenjax: train the Zen (Qwen3 / Qwen3-MoE) models with GSPO in JAX."""
