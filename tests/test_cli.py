"""The user's paths as users run them: the CLIs as subprocesses, from another directory, with relative paths.

HF checkpoint (transformers) -> `convert hf-to-orbax` -> `zenjax.train --config.init_from` -> `convert orbax-to-hf`
-> transformers loads it and its logits equal zenjax's; bad input is one line on stderr and exit status 2.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import torch
import transformers
from flax import nnx

from tests.hf_util import dense_config, save_random
from zenjax import weights
from zenjax.models import Qwen3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device (not the 8 simulated ones the test process has), the platforms jax finds (it must not report the
# ones it does not), and the checkout importable from anywhere.
ENV = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | {
    "XLA_FLAGS": re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")),
    "PYTHONPATH": ROOT}
# A two-step run: enough to prove it trains and checkpoints, short enough for the suite.
SHORT = ["--config.steps=2", "--config.rl.sft_steps=0", "--config.rl.prompts_per_step=2", "--config.rl.group_size=2",
         "--config.rl.minibatches=1", "--config.eval_every=0", "--config.rl.max_new_tokens=4"]


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run(args, cwd, timeout=300):
    proc = _start(args, cwd)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_hf_checkpoint_trains_from_converted_weights_and_exports_back(tmp_path):
    # Run from a directory outside the checkout: every path below is relative to it, the config path too.
    hf_model = save_random(dense_config(vocab_size=64, tie_word_embeddings=True), tmp_path / "hf")
    rc, out, err = _run(["convert", "hf-to-orbax", "--hf=hf", "--out=weights"], tmp_path)
    assert rc == 0, err
    # Two warm-up steps as well: a random model earns no reward, so only they are sure to move the weights.
    rc, out, err = _run(["zenjax.train", "--config=configs/nano.py:tiny", "--config.init_from=weights",
                         "--workdir=runs/rl", *SHORT, "--config.rl.sft_steps=2"], tmp_path)
    assert rc == 0, err[-3000:]
    workdir = tmp_path / "runs" / "rl"
    assert f"training from the weights in weights, in {workdir}, on 1 cpu device(s)" in out
    assert f"wrote {workdir / 'report.png'}" in out and (workdir / "report.png").exists()
    assert "Unable to initialize backend" not in err
    assert [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    rc, out, err = _run(["convert", "orbax-to-hf", "--orbax=runs/rl", "--out=export"], tmp_path)
    assert rc == 0, err

    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    # Trained from the HF weights: Adam moves a weight by at most lr a step, 2 x 3e-3 (warm-up) + 2 x 3e-4 here,
    # while a random init would be off by the weights' own scale (0.02; the norms, perturbed, by ~0.1).
    start, end = hf_model.state_dict(), exported.state_dict()
    moved = max(float((end[k] - start[k]).abs().max()) for k in start)
    assert 0 < moved <= 2 * 3e-3 + 2 * 3e-4 + 1e-6, moved

    tokens = np.random.default_rng(0).integers(0, 64, (2, 9))
    with torch.no_grad():
        want = exported(input_ids=torch.tensor(tokens)).logits.numpy()
    cfg, params = weights.load_weights(workdir, dtype="float32")
    cfg = dataclasses.replace(cfg, dtype="float32")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    got = np.asarray(nnx.merge(graphdef, state)(tokens)[0])
    # float32 on both sides; 48-wide layers: the two orders of summation differ by a few ulps of logits ~1.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    (tmp_path / "bad.jsonl").write_text("\n".join([json.dumps({"prompt": "1+1=", "answer": "2"})] * 3
                                                  + ['{"question": "no prompt field"}']) + "\n")
    cases = {
        "--config.rl.grup_size=3": "did you mean --config.rl.group_size?",
        "--config.rl.loss=ppo": "rl.loss='ppo' is not a registered loss",
        "--config.steps=-5": "steps=-5 must be >= 1",
        "--config.rl.prompts_per_step=0": "rl.prompts_per_step=0 must be >= 1",
        "--config.steps=many": "--config.steps=many: expected an int",
        "--config.data.source=bad.jsonl": "bad.jsonl:4: no prompt field 'prompt'",
        "--config=configs/nope.py": "config file 'configs/nope.py' not found",
        "--config=configs/next.py:huge": "unknown config variant 'huge'",
    }
    procs = {arg: _start(["zenjax.train", arg, f"--workdir=run{i}"] + ([] if arg.startswith("--config=") else
                                                                     ["--config=configs/next.py:tiny"]), tmp_path)
             for i, arg in enumerate(cases)}
    procs["report"] = _start(["zenjax.report", "--workdir=missing"], tmp_path)
    cases["report"] = "no metrics.jsonl in"
    for i, (arg, proc) in enumerate(procs.items()):
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (arg, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and cases[arg] in lines[0], (arg, err[-2000:])
        assert not (tmp_path / f"run{i}").exists(), f"{arg}: a failed start left a workdir"


def test_dry_run_prints_the_config_and_plan_and_runs_nothing(tmp_path):
    rc, out, err = _run(["zenjax.train", "--config=configs/next.py:tiny", "--config.rl.group_size=4", "--dry_run",
                         "--workdir=never"], tmp_path)
    assert rc == 0, err
    assert "group_size: 4" in out and "sft_steps: 100" in out  # the resolved config, every field
    assert "parameters   total" in out and "per-device memory" in out  # the plan
    assert "nothing was compiled or written" in out
    assert not (tmp_path / "never").exists()
    rc, out, err = _run(["zenjax.train", "--help"], tmp_path)  # absl's --help exits 1
    assert "--dry_run" in out and "--config.a.b=VALUE" in out


def test_the_plan_cli_finds_configs_from_another_directory(tmp_path):
    rc, out, err = _run(["zenjax.plan", "--config=configs/nano.py", "--config.mesh.data=2", "--config.mesh.fsdp=4",
                         "--devices=8"], tmp_path)
    assert rc == 0, err
    assert "mesh  data=2 fsdp=4 expert=1 tensor=1" in out
