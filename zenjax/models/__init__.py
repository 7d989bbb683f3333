from zenjax.models.qwen3 import KVCache, Qwen3, Qwen3Config, sequence_logprobs, token_logprobs

__all__ = ["KVCache", "Qwen3", "Qwen3Config", "sequence_logprobs", "token_logprobs"]
