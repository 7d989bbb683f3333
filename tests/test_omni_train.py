"""Zen Omni as users run it: `zenjax.train --config=configs/omni.py:tiny` on JSONL prompts whose images and WAV files
are paths relative to the file, from another directory, and from converted HF weights back to HF; bad media are one
line naming the prompt, exit status 2; the update on a mesh equals one device's."""
import json
import wave

import jax
import numpy as np
import torch
from PIL import Image
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

from configs import omni
from tests.test_cli import SHORT, _run, _start
from tests.test_convert import TOKENIZER_FILES
from tests.test_convert_omni import _save_thinker
from zenjax import sampling, sharding
from zenjax.config import model_config_from, prompt_media
from zenjax.data import eval_items, load_media
from zenjax.rl import rollout
from zenjax.tokenizer import CharTokenizer
from zenjax.train_state import RLHyper, init_state, make_functions, make_optimizer


def _write_prompts(root, rows):
    (root / "media").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(root / "media" / f"{i}.png")
        with wave.open(str(root / "media" / f"{i}.wav"), "wb") as f:  # 0.3 s at 22.05 kHz: cut, padded, resampled
            f.setnchannels(1), f.setsampwidth(2), f.setframerate(22050)
            f.writeframes((rng.standard_normal(6615) * 3000).astype("<i2").tobytes())
    (root / "bad.wav").write_bytes(b"RIFF-not-a-wav")
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(i, image=None, audio=None):
    return {"prompt": "count=", "answer": str(i % 4 + 1), "images": image or f"media/{i % 3}.png",
            "audios": audio or [f"media/{i % 3}.wav"]}


def test_a_converted_thinker_trains_on_jsonl_media_and_exports_back(tmp_path):
    """The user's path, from another directory: an HF thinker -> `convert hf-to-orbax` -> GSPO from its weights on
    JSONL prompts with relative image and WAV paths -> `convert orbax-to-hf` -> transformers loads it, moved by
    the warm-up and the updates only; and bad media, each one line naming the prompt, exit status 2."""
    good = [_row(i) for i in range(8)]
    bad = {  # the prompts file -> what the one line says
        "missing": (good[:2] + [_row(2, image="media/nope.png")] + good[3:],
                    "prompts.jsonl:3: image 'media/nope.png' ("),
        # Read while training: no held-out prompts, so the first batch meets it.
        "unreadable": (good[:-1] + [_row(7, audio="bad.wav")], "prompt 'prompts.jsonl:8': cannot read audio"),
        "two_images": (good[:-1] + [_row(7, image=["media/0.png", "media/1.png"])],
                       "prompt 'prompts.jsonl:8' has 2 images and 1 audio clips, but every prompt of this run has "
                       "data.images=1 and data.audios=1"),
    }
    procs = {}
    for name, (rows, _) in bad.items():
        (tmp_path / name).mkdir()
        _write_prompts(tmp_path / name, rows)
        procs[name] = _start(["zenjax.train", "--config=configs/omni.py:tiny", "--config.data.source=prompts.jsonl",
                              "--config.data.eval_size=0", "--workdir=run", *SHORT, "--config.rl.sft_steps=1",
                              "--config.rl.prompts_per_step=8"], tmp_path / name)  # a batch reads every prompt
    ref = _save_thinker(tmp_path / "hf")
    _write_prompts(tmp_path, good)
    assert _run(["convert", "hf-to-orbax", "--hf=hf", "--out=weights"], tmp_path)[0] == 0
    for name in TOKENIZER_FILES:  # stand-ins: the tiny thinker's run uses the char tokenizer and its media ids
        (tmp_path / "weights" / name).unlink()
    # Its vision patches are 4 pixels: a 32-pixel image is 64 patches, 16 tokens.
    rc, out, err = _run(["zenjax.train", "--config=configs/omni.py:tiny", "--config.init_from=weights",
                         "--config.data.source=prompts.jsonl", "--config.data.eval_size=2",
                         "--config.data.image_size=32", "--config.data.max_prompt_len=48", "--workdir=runs/rl", *SHORT, "--config.rl.sft_steps=1"],
                        tmp_path)
    assert rc == 0 and "training from the weights in weights" in out, err[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["completion_len_mean"] > 0 for m in metrics)
    rc, _, err = _run(["convert", "orbax-to-hf", "--orbax=runs/rl", "--out=export"], tmp_path)
    assert rc == 0, err
    exported = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(tmp_path / "export", dtype=torch.float32)
    start, end = ref.state_dict(), exported.state_dict()
    moved = {k: float((end[k] - start[k]).abs().max()) for k in start}
    # Adam moves a weight by at most lr a step: 3e-3 in the warm-up, and the GSPO steps' warm-up rates are ~0.
    assert 0 < max(moved.values()) <= 3e-3 + 2 * 3e-4 + 1e-6
    assert max(v for k, v in moved.items() if ".visual." in k) > 0 and max(v for k, v in moved.items()
                                                                             if ".audio_tower." in k) > 0
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and bad[name][1] in lines[0], (name, err[-3000:])
    # What the run read: the PNG as RGB at its own size, the WAV resampled to 16 kHz (cut / padded later).
    item = load_media({"id": "x", "image_paths": [str(tmp_path / "media" / "1.png")],
                       "audio_paths": [str(tmp_path / "media" / "1.wav")]})
    assert item["images"][0].shape == (48, 56, 3) and item["audios"][0].shape == (4800,)


def _omni_step(mesh_sizes):
    """One GSPO update of the tiny thinker on see_hear prompts (a group of 2 per prompt) on `mesh_sizes`."""
    c = omni.get_config("tiny")
    c.model.dtype, c.optim.warmup_steps = "float32", 0
    cfg, media = model_config_from(c.model), prompt_media(c)
    items = [dict(it, **media(it, CharTokenizer())) for it in eval_items(c.data)[:4]]
    G, L, M = 2, 24, 3
    ids, mask = sampling.left_pad([it["prompt_ids"] for it in items], L, 0)
    rng = np.random.default_rng(0)
    completion = rng.integers(3, 56, (4 * G, M))
    cmask = np.arange(M)[None] < rng.integers(1, M + 1, 4 * G)[:, None]
    batch = {"tokens": np.concatenate([np.repeat(ids, G, 0), completion], 1).astype(np.int32),
             "mask": np.concatenate([np.repeat(mask, G, 0), cmask], 1),
             "completion_mask": np.concatenate([np.zeros((4 * G, L - 1)), cmask], 1).astype(np.float32),
             "old_logp": (-4.0 + 0.3 * rng.standard_normal((4 * G, L + M - 1))).astype(np.float32),
             "adv": rng.standard_normal(4 * G).astype(np.float32),
             "media": jax.tree.map(lambda x: np.repeat(x, G, 0),
                                   rollout.media_rows(cfg, items, media.layout, ids, mask))}
    devices = jax.devices()[:int(np.prod(list(mesh_sizes.values())))] if mesh_sizes else jax.devices()[:1]
    mesh = sharding.make_mesh(**mesh_sizes, devices=devices)
    tx, schedule = make_optimizer(c.optim, 10)
    with jax.set_mesh(mesh):
        state = init_state(cfg, tx, mesh, seed=0)
        _, update = make_functions(state, cfg, tx, RLHyper("gspo", 0.2, 0.28, 0.0, 8, M), mesh, schedule, media.layout)
        batch = jax.tree.map(lambda v: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)), batch)
        before = jax.device_get(state.params)  # the update donates them
        params, _, metrics = update(state.params, state.opt_state, batch, None)
        return before, jax.device_get(params), jax.device_get(metrics)


def test_omni_update_on_a_mesh_equals_one_device():
    """The thinker's encoders and decoder, sharded over data x fsdp x expert: the same loss and the same AdamW step
    as on one device, and the step reaches both encoders."""
    before, one, m1 = _omni_step({})
    _, eight, m8 = _omni_step(dict(data=2, fsdp=2, expert=2))
    # float32 losses of order one, summed in another order over the shards: a few ulps.
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
    # Adam's first step is -lr g / (|g| + 1e-8), about lr per weight whatever the gradient's size: a wrong shard
    # moves it by ~lr. The sharded sums' rounding (~1e-10 on gradient terms ~1e-4) moves only the steps of gradients
    # that cancel to ~1e-8, by a few % of lr (1.8% seen; see test_train_step_sharded).
    lr = float(m1["lr"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0.05 * lr), one, eight)
    for tower in ("visual", "audio_tower"):
        moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one[tower]),
                                                                jax.tree.leaves(before[tower])))
        assert moved > 0.5 * lr, tower

