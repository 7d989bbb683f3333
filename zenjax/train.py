"""GSPO training: `python -m zenjax.train --config=configs/next.py[:tiny] --workdir=DIR [--config.a.b=v]`.

Each step: P prompts -> G completions each (sampler) -> rewards -> group advantages -> old-policy log-probs
-> M minibatch updates (later minibatches are off-policy, so the clip matters). Checkpoints every N steps,
at the end and on SIGTERM/SIGINT; a restart with the same workdir resumes exactly.
"""
from __future__ import annotations

import sys

from absl import flags

from zenjax import cli, hostmem

if __name__ == "__main__":  # before the imports below: --help and the huge-page re-exec need none of them
    flags.DEFINE_string("config", "configs/next.py:tiny", cli.CONFIG_HELP + " (--dry_run prints every field)")
    flags.DEFINE_string("workdir", "runs/default", "Checkpoints, metrics and plots go here.")
    flags.DEFINE_bool("dry_run", False, "Check the config and its inputs, print it and its plan, run nothing.")
    flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs without a cluster manager).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
    cli.exit_on_help(sys.argv[1:])
    hostmem.reexec_with_huge_pages()

# ruff: noqa: E402 - the imports that take seconds come after the command line's early exits
import contextlib
import copy
import dataclasses
import functools
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging as absl_logging

from zenjax import distributed, plan, sharding, storage
from zenjax.checkpoint import Checkpointer, frozen_reference, install_signal_handlers
from zenjax.config import RUNTIME_FIELDS, logprob_rows, model_config_from, prompt_media, validate
from zenjax.data import PromptLoader, eval_items
from zenjax.media import PromptMedia
from zenjax.metrics import MetricsWriter
from zenjax.models.hf import text_config
from zenjax.models.qwen3 import read_hf_config
from zenjax.rl import rewards, rollout
from zenjax.tokenizer import Tokenizer, load_tokenizer
from zenjax.train_state import RLHyper, State, abstract_state, init_state, make_functions, make_optimizer, \
    make_rollout_copy, make_sft_step
from zenjax.weights import ParamsReader, load_weights, locate, read_config
from zenjax.workdir import check_identity, check_usable, has_tokenizer, same_vocabulary, write_identity

FLAGS = flags.FLAGS
VOCAB_MULTIPLE = 128  # a from-scratch vocabulary grown to cover its tokenizer is rounded up to this


def _put(tree, mesh):
    """Host batch -> arrays sharded over the batch axes (each process passes its `sharding.batch_rows`)."""
    def one(x):
        x = np.asarray(x)
        sh = sharding.batch_sharding(mesh, x.ndim)
        return jax.make_array_from_process_local_data(sh, x)
    return jax.tree.map(one, tree)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _minibatch(batch: dict, mesh, i, m: int) -> dict:
    """Rows [i n/m, (i+1) n/m) of a batch on device, spread over the batch axes again. Cut on device because
    in multi-process runs those rows come from a few processes' shares."""
    def one(x):
        size = x.shape[0] // m
        return jax.lax.with_sharding_constraint(jax.lax.dynamic_slice_in_dim(x, i * size, size),
                                                sharding.batch_sharding(mesh, x.ndim))
    return jax.tree.map(one, batch)


def _next_batch(loader: PromptLoader) -> list[dict]:
    """The next prompts; a file that cannot be read is the user's to fix (the last checkpoint stays as it was)."""
    try:
        return next(loader)
    except ValueError as e:
        raise cli.UserError(cli.message(e)) from None


def _sft_batch(items, tokenizer):
    """prompt + reference answer + EOS, right-padded; the target mask covers the answer and EOS."""
    seqs = [it["prompt_ids"] + tokenizer.encode(it["answer"]) + [tokenizer.eos_ids[0]] for it in items]
    starts = [len(it["prompt_ids"]) for it in items]
    T = max(map(len, seqs))
    tokens = np.full((len(seqs), T), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(seqs), T), bool)
    target = np.zeros((len(seqs), T - 1), np.float32)
    for i, (s, p) in enumerate(zip(seqs, starts)):
        tokens[i, :len(s)], mask[i, :len(s)] = s, True
        target[i, p - 1:len(s) - 1] = 1.0
    return tokens, mask, target


def evaluate(policy, items, tokenizer, config, rng, layout=None) -> float:
    # A few held-out prompts, one sample each: one static batch, no slots to refill.
    out, _ = rollout.generate(policy, items, tokenizer, config.rl, rng, num_samples=1, greedy=True,
                              prompt_len=config.data.max_prompt_len, engine_name="static", layout=layout)
    r, _ = rewards.score(rollout.decode(tokenizer, rollout.fetch_all(out)), items, dict(config.rewards))
    return float(np.mean(r))


@dataclasses.dataclass
class Setup:
    """What start-up settles from the user's input, before anything is written or compiled."""
    config: ml_collections.ConfigDict  # with the architecture of `init_from` and a vocabulary that fits
    tokenizer: Tokenizer
    loader: PromptLoader
    held_out: list[dict]
    media: PromptMedia | None  # an Omni thinker's: the one shape of every prompt's media

    @property
    def layout(self):
        return None if self.media is None else self.media.layout


def _architecture_of(model: ml_collections.ConfigDict, cfg) -> None:
    """config.model's fields set to the weights' architecture, so printed and saved configs show what trains."""
    with model.ignore_type():
        for f in dataclasses.fields(cfg):
            if (f.name in model and f.name not in RUNTIME_FIELDS
                    and not isinstance(model[f.name], ml_collections.ConfigDict)):
                model[f.name] = getattr(cfg, f.name)


def setup(config: ml_collections.ConfigDict, num_devices: int | None = None) -> Setup:
    """Checks everything the user's config and files can get wrong (fields, mesh, tokenizer, data, media, the
    weights of `init_from`), raising cli.UserError naming the problem; the config returned is a resolved copy."""
    try:
        config = copy.deepcopy(config)
        own = None  # the tokenizer that came with the weights of init_from
        if config.init_from:  # the weights define the architecture; config.model keeps how to run it
            loc = locate(config.init_from)
            ParamsReader(loc.params_dir).check(read_config(config.init_from))
            config.model.hf_config = loc.config_path
            own = loc.files_dir if has_tokenizer(loc.files_dir) else None
            _architecture_of(config.model, text_config(model_config_from(config.model)))
        config.tokenizer = config.tokenizer or own or "char"
        tokenizer = load_tokenizer(config.tokenizer)
        if own and os.path.abspath(config.tokenizer) != own and not same_vocabulary(tokenizer, own):
            raise ValueError(f"--config.tokenizer={config.tokenizer} gives token ids other meanings than the "
                             f"tokenizer of --config.init_from={config.init_from}; leave config.tokenizer empty to "
                             "use the weights' own")
        if config.rl.sft_steps < 0:  # the default: a warm-up for random weights only
            config.rl.sft_steps = 0 if config.init_from else -config.rl.sft_steps
        cfg = text_config(model_config_from(config.model))
        if tokenizer.vocab_size > cfg.vocab_size:
            if config.model.hf_config:
                raise ValueError(f"tokenizer {config.tokenizer!r} has {tokenizer.vocab_size} tokens but the model "
                                 f"({config.model.hf_config}) has vocab_size={cfg.vocab_size}")
            config.model.vocab_size = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        validate(config, num_devices)
        if config.rl.engine == "continuous" and not config.rl.slots:  # as many as the devices' memory holds
            stats = jax.local_devices()[0].memory_stats() or {}  # CPUs report none: then the whole batch
            config.rl.slots = plan.plan(config, num_devices or jax.device_count(), hbm=stats.get("bytes_limit")).slots
        media = prompt_media(config)
        # Every process reads the whole batch (the sampler needs the same prompts everywhere) and so holds the
        # same data-iterator state, which then resumes on any number of processes. Each scores its rows.
        loader = PromptLoader(config.data, tokenizer, batch_size=config.rl.prompts_per_step, seed=config.seed,
                              prepare=None if media is None else lambda item: media(item, tokenizer))
        start = loader.get_state()
        next(loader)  # the first batch's files and media read before anything is written
        loader.set_state(start)
        held_out = [dict(it, **loader.prepare(it)) for it in eval_items(config.data)]
        held_out = [it for it in held_out if len(it["prompt_ids"]) <= config.data.max_prompt_len]  # as in training
    except (ValueError, KeyError, OSError) as e:
        raise cli.UserError(cli.message(e)) from None
    return Setup(config, tokenizer, loader, held_out, media)


def train(config: ml_collections.ConfigDict, workdir: str, signalled: list[int] | None = None) -> list[dict]:
    """Run (or resume) a GSPO job; returns the per-step metrics of this invocation. A run stopped by a signal
    (checkpoint saved) appends the signal's number to `signalled`."""
    s = setup(config)
    config, tokenizer, loader, held_out = s.config, s.tokenizer, s.loader, s.held_out
    cfg = model_config_from(config.model)
    try:
        check_usable(workdir)
        check_identity(workdir, cfg.to_hf(), tokenizer, config.name)
    except ValueError as e:
        raise cli.UserError(cli.message(e)) from None
    workdir = os.path.abspath(workdir)  # Orbax needs absolute paths; the run may change directory
    rl = config.rl
    main = jax.process_index() == 0
    mesh = sharding.make_mesh(**config.mesh)
    updates_per_step = rl.minibatches
    tx, schedule = make_optimizer(config.optim, config.steps * updates_per_step // config.optim.grad_accum)
    hyper = RLHyper(rl.loss, rl.eps_low, rl.eps_high, rl.kl_coef, rl.logprob_chunk,
                    completion_len=rl.max_new_tokens, logprob_rows=logprob_rows(rl))
    stop = install_signal_handlers()
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints,
                        save_every=config.checkpoint_every)
    key = jax.random.key(config.seed)
    rows = sharding.batch_rows(mesh, rl.prompts_per_step * rl.group_size)

    with jax.set_mesh(mesh), contextlib.ExitStack() as cleanup:
        graphdef, abs_params, abs_opt, param_sh, opt_sh = abstract_state(cfg, tx, mesh, config.seed)
        restored = ckpt.restore(abs_params, abs_opt)
        if restored is not None and restored[0] >= config.steps:  # verified complete: nothing to compile or run
            ckpt.close()
            if main:
                print(f"the run in {workdir} is already complete (step {restored[0]} of config.steps="
                      f"{config.steps}); pass a larger --config.steps to train on")
                if not os.path.exists(os.path.join(workdir, "report.png")):
                    _draw_report(workdir)
            return []
        if main:  # the source's other keys (token ids) kept, as a weights dir keeps them
            model_hf = {**(read_hf_config(config.model.hf_config) if config.model.hf_config else {}), **cfg.to_hf()}
            with storage.writing(workdir):
                write_identity(workdir, model_hf, config.to_json_best_effort(indent=1), tokenizer)
        if restored is not None:
            start, params, opt_state, meta = restored
            state = State(graphdef, params, opt_state, param_sh, opt_sh)
            loader.set_state(meta["data"])
            note = f"resumed from step {start} of {workdir}"
        else:
            start, meta, params = 0, {}, None
            note = f"training from scratch in {workdir}"
            if config.init_from:
                _, params = load_weights(config.init_from, mesh=mesh, dtype=text_config(cfg).param_dtype)
                note = f"training from the weights in {config.init_from}, in {workdir}"
            state = init_state(cfg, tx, mesh, config.seed, params)
        writer = MetricsWriter(workdir, config.steps, start, enabled=main)
        cleanup.callback(writer.close)  # also on an error: its line then starts below the progress bar
        writer.log(f"{note}, on {mesh.size} {mesh.devices.flat[0].platform} device(s)")
        logprobs_fn, update_fn = make_functions(state, cfg, tx, hyper, mesh, schedule, s.layout)
        # Decoding reads a compute-dtype copy in the rollout layout, or (rl.rollout_copy=False) the training state.
        policy_of = make_rollout_copy(cfg, mesh) if rl.rollout_copy else state.model

        if start == 0 and not meta.get("sft_done") and rl.sft_steps:
            state = _warm_up(state, config, tokenizer, mesh, writer, s.media)
            ckpt.save(0, state.params, state.opt_state, {"data": loader.get_state(), "sft_done": True}, force=True)

        ref_params = frozen_reference(workdir, state.params, abs_params) if rl.kl_coef > 0 else None

        def old_policy(seq):
            """The passes over the rollout batch that run while the host scores it."""
            old_logp, entropy, routing = logprobs_fn(state.params, seq["tokens"], seq["mask"], seq.get("media"))
            comp = seq["completion_mask"]
            out = {"old_logp": seq["sampler_logp"] if rl.old_logprobs == "sampler" else old_logp,
                   "entropy": jnp.sum(entropy * comp) / jnp.maximum(jnp.sum(comp), 1), "routing": routing}
            if ref_params is not None:
                out["ref_logp"] = logprobs_fn(ref_params, seq["tokens"], seq["mask"], seq.get("media"),
                                              with_entropy=False)[0]
            return out
        history, bad_in_a_row, stopping = [], 0, False
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            items = _next_batch(loader)
            rng = jax.random.fold_in(key, step)
            batch, metrics, _ = rollout.collect(policy_of(state.params), items, tokenizer, rl, config.rewards, rng,
                                                prompt_len=config.data.max_prompt_len, rows=rows, overlap=old_policy,
                                                layout=s.layout)
            t1 = time.perf_counter()
            del batch["sampler_logp"]
            batch["adv"] = _put(batch["adv"], mesh)
            entropy, routing = batch.pop("entropy"), batch.pop("routing")  # entropy: read with the update metrics
            if routing:
                batch["old_topk"] = routing["topk"]
            jax.block_until_ready(batch)
            t2 = time.perf_counter()  # the old-log-prob passes not hidden behind the rewards
            mb_metrics = []
            for i in range(rl.minibatches):
                state.params, state.opt_state, m = update_fn(state.params, state.opt_state,
                                                             _minibatch(batch, mesh, i, rl.minibatches),
                                                             routing.get("counts"))
                mb_metrics.append(m)
            mb_metrics = jax.device_get(mb_metrics)
            t3 = time.perf_counter()
            finite = all(m["finite"] > 0 for m in mb_metrics)
            bad_in_a_row = 0 if finite else bad_in_a_row + 1
            for k in mb_metrics[0]:
                metrics[k] = float(np.mean([m[k] for m in mb_metrics]))
            metrics["skipped_updates"] = sum(m["finite"] == 0 for m in mb_metrics)
            metrics["entropy"] = float(entropy)
            n_tok = int(jnp.sum(batch["mask"]))
            metrics.update(time_logprobs=t2 - t1, time_updates=t3 - t2, time_step=t3 - t0,
                           tok_per_s=float(n_tok * (rl.minibatches + 1) / max(t3 - t1, 1e-9)),
                           sampled_tok_per_s=metrics["sampled_tokens"] / max(metrics["time_sampling"], 1e-9))
            if config.eval_every and (step + 1) % config.eval_every == 0:
                metrics["eval_reward"] = evaluate(policy_of(state.params), held_out, tokenizer, config,
                                                  jax.random.key(0), s.layout)
            writer.write(step + 1, metrics)
            history.append(dict(metrics, step=step + 1))
            if bad_in_a_row >= config.optim.max_bad_steps:
                writer.log(f"stopping: {bad_in_a_row} steps in a row had a non-finite loss or gradient")
                ckpt.save(step + 1, state.params, state.opt_state, {"data": loader.get_state(), "sft_done": True},
                          force=True)
                raise FloatingPointError(f"{bad_in_a_row} consecutive non-finite updates at step {step + 1}")
            stopping = stop()
            ckpt.save(step + 1, state.params, state.opt_state, {"data": loader.get_state(), "sft_done": True},
                      force=stopping or step + 1 == config.steps)
            if stopping:
                writer.log(f"signal received: checkpoint saved at step {step + 1}, exiting")
                if signalled is not None:  # another process's signal stops this one too: then SIGTERM's status
                    signalled.append((stop.received or [signal.SIGTERM])[0])
                break
        ckpt.wait()
        ckpt.close()
    if main and not stopping:
        writer.log(f"wrote {_draw_report(workdir)}")
    return history


def _draw_report(workdir: str) -> str:
    from zenjax import report  # noqa: PLC0415 - matplotlib only when a run finishes

    with storage.writing(os.path.join(workdir, "report.png"), patience=60):  # it draws as well
        return report.plot(workdir)


def _warm_up(state: State, config, tokenizer, mesh, writer, media: PromptMedia | None = None) -> State:
    """A short supervised warm-up on reference answers so a from-scratch tiny model gets non-zero rewards."""
    rl = config.rl
    sft_tx, _ = make_optimizer(ml_collections.ConfigDict(dict(config.optim, lr=rl.sft_lr, grad_accum=1)),
                               rl.sft_steps)
    sft_state = init_state(model_config_from(config.model), sft_tx, mesh, config.seed, state.params)
    step_fn = make_sft_step(sft_state, sft_tx, None if media is None else media.layout)
    n = rl.prompts_per_step * rl.group_size
    # The whole batch on every process: its padded length must be the same everywhere.
    loader = PromptLoader(config.data, tokenizer, batch_size=n, seed=config.seed + 1,
                          prepare=None if media is None else lambda item: media(item, tokenizer))
    rows = sharding.batch_rows(mesh, n)
    params, opt_state = sft_state.params, sft_state.opt_state
    for i in range(rl.sft_steps):
        items = _next_batch(loader)
        tokens, mask, target = _sft_batch(items, tokenizer)
        rows_media = None if media is None else rollout.media_rows(media.cfg, items, media.layout, tokens, mask)
        batch = _put(jax.tree.map(lambda x: x[rows], (tokens, mask, target, rows_media)), mesh)
        params, opt_state, loss = step_fn(params, opt_state, *batch)
        if (i + 1) % max(rl.sft_steps // 5, 1) == 0:
            writer.log(f"warm-up {i + 1}/{rl.sft_steps}: cross-entropy {float(loss):.3f}")
    state.params = params  # the GSPO optimizer state starts fresh: warm-up moments belong to another objective
    return state


def dry_run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Checks the config, its inputs and the workdir and prints the resolved config (the model that will train),
    the held-out split and the plan; runs and writes nothing."""
    jax.config.update("jax_platforms", "cpu")  # never claim the accelerators a running job may hold
    devices = plan.fixed_devices(config.mesh)
    s = setup(config, num_devices=devices)
    config = s.config
    try:
        check_usable(workdir)
        check_identity(workdir, model_config_from(config.model).to_hf(), s.tokenizer, config.name)
    except ValueError as e:
        raise cli.UserError(cli.message(e)) from None
    print(config)
    first = s.held_out[0] if s.held_out else None
    print(f"held-out split: {len(s.held_out)} prompts of {config.data.source} (data.eval_size={config.data.eval_size}"
          f", never trained on), greedy reward every {config.eval_every} steps"
          + (f"; the first: {first['prompt']!r} -> {first.get('answer')!r}" if first else ""))
    print(plan.format_plan(plan.plan(config, devices), config.hf_model_id))
    print(f"dry run: the config and its inputs are valid for {devices} device(s) (the mesh's fixed axes); "
          f"nothing was compiled or written to {os.path.abspath(workdir)}")


def main(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; flags are --name=value")
    if FLAGS.dry_run:
        return dry_run(config, FLAGS.workdir)
    # Before the backends start: jax reports each platform it does not find at INFO (e.g. no libtpu on a CPU host),
    # Orbax every file it writes.
    absl_logging.set_verbosity(absl_logging.WARNING)
    distributed.skip_absent_tpu()
    distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    hostmem.keep_freed_memory()
    signalled = []
    train(config, FLAGS.workdir, signalled)
    if signalled:  # 128 + the signal, as the shell reports a process it killed: `train && convert` stops here
        sys.exit(128 + signalled[0])


if __name__ == "__main__":
    cli.run(main)
