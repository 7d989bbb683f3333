"""The rollout layout on 8 simulated devices: decoding from the rollout copy of a sharded training state equals one
device token for token, its log-probs are the trainer's, the copy holds no FSDP shard, and the old-log-prob pass
in microbatches equals the whole batch. Two processes each fetch only the completions they score."""
import dataclasses
import json
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from tests.multiprocess_util import run_processes
from zenjax import sharding
from zenjax.models import Qwen3, Qwen3Config
from zenjax.rl import rollout
from zenjax.sampling import sample
from zenjax.train_state import RLHyper, abstract_state, init_state, make_functions, make_optimizer, make_rollout_copy

DENSE = Qwen3Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    intermediate_size=48, dtype="float32")
MOE = dataclasses.replace(DENSE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)
PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12], [1, 2]]
NEW = 6


def _params(cfg):
    return nnx.to_pure_dict(nnx.state(nnx.jit(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))()))


def _optim():
    import ml_collections  # noqa: PLC0415

    return ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0, b1=0.9, b2=0.999,
                                          weight_decay=0.0, grad_clip=1.0, grad_accum=1))


def _state(cfg, mesh, params):
    """A training state on `mesh` holding `params`, placed by the training rules."""
    tx, _ = make_optimizer(_optim(), 10)
    param_sh = abstract_state(cfg, tx, mesh)[3]
    return init_state(cfg, tx, mesh, 0, jax.device_put(params, param_sh))


def _logprobs(state, cfg, rows=0):
    """The trainer's old-log-prob function, `rows` sequences per pass (0: all)."""
    tx, schedule = make_optimizer(_optim(), 10)
    hyper = RLHyper("gspo", 0.2, 0.28, 0.0, 16, completion_len=NEW, logprob_rows=rows)
    return make_functions(state, cfg, tx, hyper, None, schedule)[0]


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("axes", [dict(fsdp=2, expert=2, tensor=2), dict(data=2, fsdp=4)], ids=str)
def test_greedy_rollouts_from_the_rollout_copy_equal_one_device(cfg, axes):
    params = _params(cfg)
    kw = dict(num_samples=2, max_new_tokens=NEW, rng=None, greedy=True, prompt_len=8)
    want = sample(nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))), params),
                  PROMPTS, **kw)
    mesh = sharding.make_mesh(**axes)
    with jax.set_mesh(mesh):
        state = _state(cfg, mesh, params)
        policy = make_rollout_copy(cfg, mesh)(state.params)
        copy = nnx.to_pure_dict(nnx.state(policy))
        # Nothing of the copy is split over fsdp: a decode step has no weight to gather.
        for x in jax.tree.leaves(copy):
            assert all("fsdp" not in (e if isinstance(e, tuple) else (e,)) for e in x.sharding.spec), x.sharding
        assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state.params))
        got = sample(policy, PROMPTS, **kw)
        seq = rollout.sequences(got)
        old, _, _ = _logprobs(state, cfg)(state.params, seq["tokens"], seq["mask"])
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    # The sampler's raw-model log-probs are the trainer's recomputed old log-probs: the same float32 math over
    # another batching (cached decode vs one causal pass), so they agree to float32 rounding of a few dozen terms.
    comp = np.asarray(seq["completion_mask"])
    np.testing.assert_allclose(np.asarray(seq["sampler_logp"]), np.asarray(old) * comp, atol=1e-5)


def test_microbatched_old_logprobs_equal_the_whole_batch():
    params = _params(MOE)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (16, 12)).astype(np.int32)
    mask = np.arange(12)[None] >= rng.integers(0, 5, 16)[:, None]
    mesh = sharding.make_mesh(data=2, fsdp=2, expert=2)
    with jax.set_mesh(mesh):
        state = _state(MOE, mesh, params)
        batch = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (tokens, mask)]
        whole = jax.device_get(_logprobs(state, MOE, rows=0)(state.params, *batch))
        parts = jax.device_get(_logprobs(state, MOE, rows=4)(state.params, *batch))  # 4 passes of 4
    # Each row's forward is the same computation in either batching; XLA may block the matmuls differently for
    # 4 rows than for 16, so float32 rounding (~1e-7 relative per op, a few dozen ops deep) is all that differs.
    np.testing.assert_allclose(parts[0], whole[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts[1], whole[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(parts[2]["topk"], whole[2]["topk"])
    jax.tree.map(np.testing.assert_array_equal, parts[2]["counts"], whole[2]["counts"])


WORKER = """
import json, sys
import numpy as np
from zenjax import distributed

distributed.initialize()
import jax
from jax.experimental import multihost_utils
from tests.test_rollout_layout import collect_rows

gathered = []
allgather = multihost_utils.process_allgather
multihost_utils.process_allgather = lambda x, **k: gathered.append(np.shape(x)) or allgather(x, **k)
rows, texts = collect_rows(jax.devices())
out = {"rows": rows.tolist(), "texts": texts, "gathered": gathered}
with open(f"{sys.argv[1]}/{jax.process_index()}.json", "w") as f:
    json.dump(out, f)
"""


class _Chars:
    eos_ids, pad_id, vocab_size = (0,), 63, 64

    def decode(self, ids):
        return " ".join(map(str, ids))


def collect_rows(devices):
    """One rollout of a tiny dense model on a 4-device mesh: this process's rows and their decoded texts."""
    import ml_collections  # noqa: PLC0415

    mesh = sharding.make_mesh(data=4, devices=devices)
    rl = ml_collections.ConfigDict(dict(group_size=2, max_new_tokens=NEW, temperature=1.0, top_k=0, top_p=1.0,
                                        scale_std=True, engine="continuous", slots=4))
    items = [{"id": str(i), "prompt_ids": p, "answer": "7", "prompt": ""} for i, p in enumerate(PROMPTS)]
    rows = sharding.batch_rows(mesh, len(items) * rl.group_size)
    tx, _ = make_optimizer(_optim(), 10)
    with jax.set_mesh(mesh):
        state = init_state(DENSE, tx, mesh, 0)
        batch, metrics, texts = rollout.collect(make_rollout_copy(DENSE, mesh)(state.params), items, _Chars(), rl,
                                                {"math": 1.0}, jax.random.key(3), prompt_len=8, rows=rows)
    assert len(batch["adv"]) == len(rows) and metrics["sampled_tokens"] > 0
    return rows, texts


def test_each_process_fetches_only_the_completions_it_scores(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    r = run_processes(["python", str(worker), str(tmp_path)], tmp_path / "logs", timeout=180)
    assert r.returncode == 0, r.report()
    shares = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    rows_all, texts_all = collect_rows(jax.devices()[:4])
    assert sorted(shares[0]["rows"] + shares[1]["rows"]) == list(range(8))
    for s in shares:
        assert len(s["rows"]) == 4 and s["texts"] == [texts_all[i] for i in s["rows"]]
        # Only the reward shares (JSON bytes) and their lengths cross processes, never a [rows, tokens] array.
        assert s["gathered"] and all(len(shape) <= 1 for shape in s["gathered"]), s["gathered"]
