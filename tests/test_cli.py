"""The user's paths as users run them: the CLIs as subprocesses, from another directory, with relative paths.

HF checkpoint (transformers) -> `convert hf-to-orbax` -> `zenjax.train --config.init_from` -> `convert orbax-to-hf`
-> transformers loads it and its logits equal zenjax's; bad input is one line on stderr and exit status 2.
"""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import transformers
from flax import nnx

from tests.hf_util import dense_config, save_random
from tests.test_tokenizer import _save_bpe
from zenjax import weights
from zenjax.models import Qwen3
from zenjax.weights import umask as _umask

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


def _snapshot(directory):
    """Every file and folder under `directory` with its size, mtime and mode: equal snapshots, nothing changed."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
            for p in directory.rglob("*")}


def _stop_with(signum, args, cwd, metrics, lines):
    """Starts `args`, sends `signum` once `metrics` has `lines` rows; (exit status, stdout, stderr)."""
    proc = _start(args, cwd)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            proc.send_signal(signum)
            break
        time.sleep(0.2)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def test_hf_checkpoint_trains_from_converted_weights_and_exports_back(tmp_path):
    # Run from a directory outside the checkout: every path below is relative to it, the config path too.
    # The checkpoint has its own tokenizer (300 BPE tokens, a chat template, EOS <|im_end|>), as a Qwen3 one has.
    hf_tok = _save_bpe(tmp_path / "hf")
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    hf_model = save_random(dense_config(vocab_size=384, tie_word_embeddings=True, eos_token_id=im_end),
                           tmp_path / "hf")
    rc, out, err = _run(["convert", "hf-to-orbax", "--hf=hf", "--out=weights"], tmp_path)
    assert rc == 0, err
    # Only --config.init_from: the weights bring their tokenizer. Two warm-up steps asked for (a pretrained start
    # has none by default): a random model earns no reward, so only they are sure to move the weights.
    train = ["zenjax.train", "--config=configs/nano.py:tiny", "--config.init_from=weights", *SHORT]
    rc, out, err = _run([*train, "--workdir=runs/rl", "--config.rl.sft_steps=2"], tmp_path)
    assert rc == 0, err[-3000:]
    workdir = tmp_path / "runs" / "rl"
    assert f"training from the weights in weights, in {workdir}, on 1 cpu device(s)" in out
    assert "warm-up 2/2" in out
    assert f"wrote {workdir / 'report.png'}" in out and (workdir / "report.png").exists()
    assert "Unable to initialize backend" not in err
    assert [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert oct((workdir / "config.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    rc, out, err = _run(["convert", "orbax-to-hf", "--orbax=runs/rl", "--out=export"], tmp_path)
    assert rc == 0, err
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700

    # The export is complete: its tokenizer is the checkpoint's, and generate() stops at the chat EOS.
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert tok.get_vocab() == hf_tok.get_vocab() and tok.chat_template == hf_tok.chat_template
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    assert im_end in np.atleast_1d(exported.generation_config.eos_token_id)
    prompt = tok.apply_chat_template([{"role": "user", "content": "what is two plus three"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():  # <|im_end|> made likely after a few tokens: the generation must end there
        gen = exported.generate(prompt, max_new_tokens=12, do_sample=False, sequence_bias={(im_end,): 30.0})
    assert gen.shape[1] == prompt.shape[1] + 1 and gen[0, -1] == im_end, gen

    # Trained from the HF weights: Adam moves a weight by at most lr a step, 2 x 3e-3 (warm-up) + 2 x 3e-4 here,
    # while a random init would be off by the weights' own scale (0.02; the norms, perturbed, by ~0.1).
    start, end = hf_model.state_dict(), exported.state_dict()
    moved = max(float((end[k] - start[k]).abs().max()) for k in start)
    assert 0 < moved <= 2 * 3e-3 + 2 * 3e-4 + 1e-6, moved

    tokens = np.random.default_rng(0).integers(0, 384, (2, 9))
    with torch.no_grad():
        want = exported(input_ids=torch.tensor(tokens)).logits.numpy()
    cfg, params = weights.load_weights(workdir, dtype="float32")
    cfg = dataclasses.replace(cfg, dtype="float32")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    got = np.asarray(nnx.merge(graphdef, state)(tokens)[0])
    # float32 on both sides; 48-wide layers: the two orders of summation differ by a few ulps of logits ~1.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    # Wrong commands against the finished workdir: one line (or a plain answer), and nothing in it changes.
    before = _snapshot(workdir)
    cases = {  # args -> (exit status, the line on stderr, or on stdout for status 0)
        ("zenjax.train", "--config=configs/next.py:tiny", "--workdir=runs/rl", *SHORT):
            (2, "holds a run of another model or tokenizer ('zen-nano-tiny' vs 'zen-next-tiny': model_type 'qwen3' "
                "vs 'qwen3_moe'"),
        (*train, "--workdir=runs/rl", "--config.tokenizer=char"):
            (2, "--config.tokenizer=char gives token ids other meanings than the tokenizer of --config.init_from=weights"),
        (*train, "--workdir=runs/rl"): (0, f"the run in {workdir} is already complete (step 2 of config.steps=2)"),
        ("zenjax.train", "--config=configs/nano.py:tiny", "--config.init_from=weights", "--workdir=never",
         "--dry_run"): (0, "held-out split: 16 prompts of arithmetic"),
    }
    procs = {args: _start(list(args), tmp_path) for args in cases}
    for args, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        status, line = cases[args]
        assert proc.returncode == status, (args, err[-2000:])
        if status:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and line in lines[0], (args, err[-2000:])
        else:
            assert line in out and "Traceback" not in err, (args, out[-2000:], err[-2000:])
        if "--dry_run" in args:  # the model that will train (the weights'), no warm-up on pretrained weights
            assert "vocab_size: 384" in out and "head_dim: 16" in out and "sft_steps: 0" in out, out
            assert f"tokenizer: {tmp_path / 'weights'}" in out, out
    assert not (tmp_path / "never").exists()
    assert _snapshot(workdir) == before

    # Stopped by a signal: its checkpoint saved, then 130 for Ctrl-C and 143 for SIGTERM, as a shell reports them.
    # Two copies of the finished run resume side by side, and each is stopped once it has trained a step.
    shutil.copytree(workdir, tmp_path / "runs" / "rl2")
    with ThreadPoolExecutor(2) as pool:
        stopped = {signum: pool.submit(_stop_with, signum, [*train, f"--workdir=runs/{run}", "--config.steps=1000"],
                                       tmp_path, tmp_path / "runs" / run / "metrics.jsonl", 3)
                   for signum, run in ((signal.SIGINT, "rl"), (signal.SIGTERM, "rl2"))}
    for (signum, future), run in zip(stopped.items(), ("rl", "rl2")):
        rc, out, err = future.result()
        assert rc == 128 + signum, (signum, rc, err[-2000:])
        saved = int(re.search(r"checkpoint saved at step (\d+), exiting", out).group(1))
        assert saved >= 3 and weights.locate(tmp_path / "runs" / run).step == saved


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    (tmp_path / "bad.jsonl").write_text("\n".join([json.dumps({"prompt": "1+1=", "answer": "2"})] * 3
                                                  + ['{"question": "no prompt field"}']) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "upper.jsonl").write_text("".join(json.dumps({"prompt": "What is 1+1?", "answer": "2"}) + "\n"
                                                  for _ in range(3)))
    (tmp_path / "a_file").write_text("not a directory")
    cases = {  # the arguments after --config=configs/next.py:tiny (unless they name a config) -> the line
        "--config.rl.grup_size=3": "did you mean --config.rl.group_size?",
        "--config.rl.loss=ppo": "rl.loss='ppo' is not a registered loss",
        "--config.steps=-5": "steps=-5 must be >= 1",
        "--config.rl.prompts_per_step=0": "rl.prompts_per_step=0 must be >= 1",
        "--config.steps=many": "--config.steps=many: expected an int",
        "--config.data.source=bad.jsonl": "bad.jsonl:4: no prompt field 'prompt'",
        "--config=configs/nope.py": "config file 'configs/nope.py' not found",
        "--config=configs/next.py:huge": "unknown config variant 'huge'",
        "--config.data.source=empty.jsonl": "data.source 'empty.jsonl' holds no prompts",
        # Found on the first batch, which is read before anything is written.
        "--config.data.source=upper.jsonl --config.data.eval_size=1":
            ("prompt 'upper.jsonl:", "': CharTokenizer cannot encode 'W'"),  # file:line, whichever line comes first
        "--workdir=a_file": f"{tmp_path / 'a_file'} is a file; pass a directory",
        "--workdir=a_file/run": f"{tmp_path / 'a_file' / 'run'} cannot be created: {tmp_path / 'a_file'} is a file",
    }

    def command(i, arg):
        args = arg.split()
        config = [] if args[0].startswith("--config=") else ["--config=configs/next.py:tiny"]
        workdir = [] if args[0].startswith("--workdir=") else [f"--workdir=run{i}"]
        return ["zenjax.train", *config, *workdir, *args]

    procs = {arg: _start(command(i, arg), tmp_path) for i, arg in enumerate(cases)}
    procs["report"] = _start(["zenjax.report", "--workdir=missing"], tmp_path)
    cases["report"] = "no metrics.jsonl in"
    before = _snapshot(tmp_path)
    for i, (arg, proc) in enumerate(procs.items()):
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (arg, err[-2000:])
        want = cases[arg] if isinstance(cases[arg], tuple) else (cases[arg],)
        assert len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in want), (arg, err)
        assert not (tmp_path / f"run{i}").exists(), f"{arg}: a failed start left a workdir"
    assert _snapshot(tmp_path) == before


def test_dry_run_prints_the_config_and_plan_and_runs_nothing(tmp_path):
    rc, out, err = _run(["zenjax.train", "--config=configs/next.py:tiny", "--config.rl.group_size=4", "--dry_run",
                         "--workdir=never"], tmp_path)
    assert rc == 0, err
    assert "group_size: 4" in out and "sft_steps: 100" in out  # the resolved config, every field
    assert "parameters   total" in out and "per-device memory" in out  # the plan
    assert "nothing was compiled or written" in out
    assert not (tmp_path / "never").exists()
    helps = {tool: _start([tool, "--help"], tmp_path)
             for tool in ("zenjax.train", "zenjax.plan", "zenjax.report", "zenjax.compile")}
    outs = {tool: proc.communicate(timeout=300)[0] for tool, proc in helps.items()}
    assert all(proc.returncode == 0 for proc in helps.values()), outs  # absl's own --help exits 1
    assert "--dry_run" in outs["zenjax.train"] and "--config.a.b=VALUE" in outs["zenjax.train"]
    assert "--devices" in outs["zenjax.plan"] and "--workdir" in outs["zenjax.report"]


def test_the_plan_cli_finds_configs_from_another_directory(tmp_path):
    rc, out, err = _run(["zenjax.plan", "--config=configs/nano.py", "--config.mesh.data=2", "--config.mesh.fsdp=4",
                         "--devices=8"], tmp_path)
    assert rc == 0, err
    assert "mesh  data=2 fsdp=4 expert=1 tensor=1" in out


def test_an_older_python_is_told_before_pip_downloads_anything():
    # setup.py runs when pip asks the build backend for its requirements, before it resolves any dependency
    # (measured with pip 23 on Python 3.10.13: the message, then exit, in 7 s; without it, a 50 MB download and a
    # failure on grain). Here the interpreter's version is made older than it is.
    r = subprocess.run([sys.executable, "-c", "import sys; sys.version_info = (3, 10, 13); "
                        "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: zenjax needs Python >= 3.11"), r.stderr
