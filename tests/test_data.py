"""Prompt sources, the held-out split and the grain-backed PromptLoader."""

import json
import logging
import re
import wave

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.signal import resample_poly

from zenjax import data
from zenjax.tokenizer import CharTokenizer

TOK = CharTokenizer()


def cfg_for(**kw):
    cfg = data.default_data_config()
    cfg.update(kw)
    return cfg


def ids(batches):
    return [it["id"] for b in batches for it in b]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_arithmetic_task_split_and_answers():
    cfg = cfg_for(source="arithmetic")  # a+b, one digit: exactly the 100 problems
    train, held = data.make_prompt_source(cfg), data.eval_items(cfg)
    assert len(held) == cfg.eval_size == 16 and len(train) == 84
    prompts = [it["prompt"] for it in held] + [train[i]["prompt"] for i in range(len(train))]
    assert sorted(prompts) == sorted(f"{a}+{b}=" for a in range(10) for b in range(10))
    assert data.eval_items(cfg) == held  # fixed
    for it in held + [train[i] for i in range(len(train))]:
        a, b = it["prompt"][:-1].split("+")
        assert it["answer"] == str(int(a) + int(b)) and it["tests"] is None
        assert TOK.encode(it["answer"])  # the answer is in the char vocabulary

    cfg = cfg_for(source="arithmetic", ops="+-*", operand_digits=2, eval_size=50)
    train = data.make_prompt_source(cfg)
    assert len(train) == 3 * 100 * 100 - 50
    seen_ops = set()
    for i in range(0, len(train), 997):
        p = train[i]["prompt"]
        op = next(o for o in "+-*" if o in p[1:])  # the first character may be a digit only
        a, b = p[:-1].split(op)
        assert train[i]["answer"] == str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
        seen_ops.add(op)
    assert seen_ops == {"+", "-", "*"}


def test_reverse_task():
    cfg = cfg_for(source="reverse", reverse_len=3, eval_size=10)
    train, held = data.make_prompt_source(cfg), data.eval_items(cfg)
    every = held + [train[i] for i in range(len(train))]
    assert sorted(it["prompt"] for it in every) == [f"rev {k:03d}=" for k in range(1000)]
    for it in every[:50]:
        digits = it["prompt"][4:7]
        assert it["answer"] == digits[2] + digits[1] + digits[0]


def test_same_seed_same_order_and_epochs():
    cfg = cfg_for()
    a = ids(take(data.PromptLoader(cfg, TOK, batch_size=4, seed=7), 42))  # two epochs of 84
    b = ids(take(data.PromptLoader(cfg, TOK, batch_size=4, seed=7), 42))
    c = ids(take(data.PromptLoader(cfg, TOK, batch_size=4, seed=8), 42))
    assert a == b and a != c
    train = data.make_prompt_source(cfg)
    everything = sorted(train[i]["id"] for i in range(len(train)))
    assert sorted(a[:84]) == everything and sorted(a[84:]) == everything  # each epoch is a permutation
    assert a[:84] != a[84:]  # reshuffled per epoch
    assert not set(a) & {it["id"] for it in data.eval_items(cfg)}
    batch = data.PromptLoader(cfg, TOK, batch_size=3, seed=0).__next__()
    assert len(batch) == 3 and all(it["prompt_ids"] == TOK.encode_prompt(it["prompt"]) for it in batch)


def test_state_restores_mid_epoch():
    cfg = cfg_for()
    loader = data.PromptLoader(cfg, TOK, batch_size=5, seed=3)
    take(loader, 7)  # 35 of 84: mid-epoch
    state = json.loads(json.dumps(loader.get_state()))
    expected = ids(take(loader, 12))  # runs over the epoch boundary
    fresh = data.PromptLoader(cfg, TOK, batch_size=5, seed=3)
    fresh.set_state(state)
    assert ids(take(fresh, 12)) == expected
    assert fresh.stats == loader.stats


@pytest.mark.parametrize("count", [3, 5])
def test_process_shards_are_disjoint_and_cover(count):
    cfg = cfg_for()
    n = len(data.make_prompt_source(cfg))
    shards = []
    for p in range(count):
        loader = data.PromptLoader(cfg, TOK, batch_size=1, seed=11, process_index=p, process_count=count)
        shards.append(ids(take(loader, len(range(p, n, count)))))  # this process's share of epoch 1
    union = [i for s in shards for i in s]
    assert len(union) == len(set(union)) == n
    # and the shards interleave the single-process stream
    single = ids(take(data.PromptLoader(cfg, TOK, batch_size=1, seed=11), n))
    assert all(shards[p] == single[p::count] for p in range(count))


def _rows():
    return [
        {"uid": "q1", "question": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1="}],
         "solution": 2, "unit_tests": ["assert f(1) == 2", "assert f(2) == 3"]},
        {"uid": "q2", "question": [{"role": "user", "content": "2+3="}], "solution": 5, "unit_tests": ["pass"]},
        {"uid": "q3", "question": [{"role": "user", "content": "4*4="}], "solution": 16, "unit_tests": []},
    ]


def _check_file_items(cfg):
    items = {it["id"]: it for it in data.eval_items(cfg)}
    src = data.make_prompt_source(cfg)
    items.update({src[i]["id"]: src[i] for i in range(len(src))})
    assert len(data.eval_items(cfg)) == 1 and len(src) == 2
    assert items["q1"] == {"id": "q1", "prompt": [{"role": "system", "content": "add"},
                                                  {"role": "user", "content": "1+1="}],
                           "answer": "2", "tests": "assert f(1) == 2\nassert f(2) == 3"}
    assert items["q3"]["answer"] == "16" and items["q3"]["tests"] == ""
    batch = next(data.PromptLoader(cfg, TOK, batch_size=2, seed=0))
    for it in batch:
        assert it["prompt_ids"] == [TOK.BOS] + TOK.encode("\n".join(m["content"] for m in it["prompt"]))


def test_jsonl_with_chat_messages_and_custom_fields(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n\n")
    _check_file_items(cfg_for(source=str(path), prompt_field="question", answer_field="solution",
                              tests_field="unit_tests", id_field="uid", eval_size=1))


def test_parquet_with_chat_messages_and_custom_fields(tmp_path):
    pq.write_table(pa.Table.from_pylist(_rows()[:2]), tmp_path / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(_rows()[2:]), tmp_path / "part-1.parquet")
    cfg = cfg_for(source=str(tmp_path / "part-*.parquet"), prompt_field="question", answer_field="solution",
                  tests_field="unit_tests", id_field="uid", eval_size=1)
    _check_file_items(cfg)
    # without an id field: file name and row number; without an answer field: None
    cfg.update(id_field="", answer_field="")
    every = data.eval_items(cfg) + list(data.make_prompt_source(cfg))
    assert sorted(it["id"] for it in every) == ["part-0.parquet:0", "part-0.parquet:1", "part-1.parquet:0"]
    assert all(it["answer"] is None for it in every)


def test_length_filter_is_counted_and_logged(tmp_path, caplog):
    # CharTokenizer prompt length = 1 (bos) + characters, so max_prompt_len 6 keeps prompts of <= 5 characters.
    prompts = ["1+1=", "22+2=", "333+3=", "4+44=", "5555+5=", "6+6=", "77+77=", "8+8="]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "id": f"p{i}"}) for i, p in enumerate(prompts)))
    short = {f"p{i}" for i, p in enumerate(prompts) if len(p) <= 5}
    assert len(short) == 5
    unfiltered = ids(take(data.PromptLoader(cfg_for(source=str(path), eval_size=0), TOK, batch_size=1, seed=5), 16))
    loader = data.PromptLoader(cfg_for(source=str(path), eval_size=0, max_prompt_len=6), TOK, batch_size=1, seed=5)
    with caplog.at_level(logging.WARNING, logger="zenjax.data"):
        got = ids(take(loader, 7))  # over an epoch boundary: 5 short prompts per epoch
    assert got == [i for i in unfiltered if i in short][:7]
    # The loader read the unfiltered stream exactly up to its 7th short prompt.
    consumed = next(n for n in range(1, 17) if sum(i in short for i in unfiltered[:n]) == 7)
    assert loader.stats == {"seen": consumed, "dropped_too_long": consumed - 7}
    assert "dropped prompt" in caplog.text and "max_prompt_len 6" in caplog.text
    with pytest.raises(ValueError, match="every prompt is longer"):
        next(data.PromptLoader(cfg_for(source=str(path), eval_size=0, max_prompt_len=2), TOK, batch_size=1, seed=0))


def test_bad_config_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a synthetic task"):
        data.make_prompt_source(cfg_for(source=str(tmp_path / "nope.jsonl")))
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "hi"}) + "\n" + json.dumps({"text": "yo"}))
    with pytest.raises(ValueError, match=r"no prompt field 'prompt' \(fields: \['text'\]\)"):
        data.make_prompt_source(cfg_for(source=str(path), eval_size=0))
    with pytest.raises(ValueError, match="eval_size=16 must be in"):
        data.make_prompt_source(cfg_for(source=str(path), prompt_field="text"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1="}) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match="bad.jsonl:2: not a JSON object per line"):
        data.make_prompt_source(cfg_for(source=str(bad), eval_size=0))
    # Errors name the line as an editor counts it, whatever is wrong with it (blank lines count too).
    bad.write_text(json.dumps({"prompt": "1+1="}) + "\n\n" + json.dumps({"question": "2+2="}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:3: no prompt field 'prompt'"):
        data.make_prompt_source(cfg_for(source=str(bad), eval_size=0))
    with pytest.raises(ValueError, match="ops from"):
        data.eval_items(cfg_for(ops="+/"))
    with pytest.raises(ValueError, match="process_index 2"):
        data.PromptLoader(cfg_for(), TOK, batch_size=1, seed=0, process_index=2, process_count=2)


# ------------------------------------------------------------------------------------------- multimodal

def _squares(image_HWC):
    """The solid squares of a see_hear image, found from the pixels alone: [(quadrant, side, colour)]."""
    from scipy import ndimage

    regions, _ = ndimage.label(image_HWC.any(axis=-1))
    half, out = image_HWC.shape[0] // 2, []
    for sl in ndimage.find_objects(regions):
        box = image_HWC[sl].reshape(-1, 3)
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        assert h == w and (box == box[0]).all() and set(box[0]) <= {0, 255}  # a filled square of a saturated colour
        corners = [(y, x) for y in (sl[0].start, sl[0].stop - 1) for x in (sl[1].start, sl[1].stop - 1)]
        quadrants = {(y // half) * 2 + x // half for y, x in corners}
        assert len(quadrants) == 1  # inside one quadrant
        out.append((quadrants.pop(), h, tuple(box[0])))
    return out


def _pitch(x_T):
    return np.argmax(np.abs(np.fft.rfft(x_T))) * data.SAMPLING_RATE / len(x_T)


def test_see_hear_answers_from_pixels_and_waveform():
    cfg = cfg_for(source="see_hear")
    train, held = data.make_prompt_source(cfg), data.eval_items(cfg)
    assert len(train) + len(held) == 7168 and len(held) == 16
    items = held + [train[i] for i in range(0, len(train), 23)]
    assert len({it["id"] for it in items}) == len(items) and all(it["id"].startswith("see_hear:") for it in items)
    answers = {"count=": set(), "high=": set()}
    for it in items:
        (image,), (audio,) = it["images"], it["audios"]
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
        assert audio.dtype == np.float32 and audio.shape == (8000,) and np.abs(audio).max() <= 0.5 + 1e-6
        assert TOK.encode(it["prompt"]) and it["tests"] is None
        squares = _squares(image)
        assert len({q for q, _, _ in squares}) == len(squares) and all(32 / 3 - 1 <= s <= 16 for _, s, _ in squares)
        first, second = _pitch(audio[:4000]), _pitch(audio[4000:])
        assert 190 <= min(first, second) and max(first, second) <= 3300 and abs(first - second) > 50
        want = str(len(squares)) if it["prompt"] == "count=" else "1" if first > second else "2"
        assert it["answer"] == want, it["id"]
        answers[it["prompt"]].add(want)
    assert answers == {"count=": {"1", "2", "3", "4"}, "high=": {"1", "2"}}
    # deterministic: the same arrays on every access, from every fresh source
    again = data.make_prompt_source(cfg)
    for i in (0, 5, 4000):
        a, b = train[i], again[i]
        assert a["id"] == b["id"] and (a["images"][0] == b["images"][0]).all()
        assert (a["audios"][0] == b["audios"][0]).all()
    assert [it["id"] for it in data.eval_items(cfg)] == [it["id"] for it in held]
    # other sizes; a batch from the loader keeps its media
    small = data.make_prompt_source(cfg_for(source="see_hear", image_size=32, tone_seconds=0.1))[3]
    assert small["images"][0].shape == (32, 32, 3) and small["audios"][0].shape == (3200,)
    batch = next(data.PromptLoader(cfg, TOK, batch_size=2, seed=0))
    assert all(it["images"][0].shape == (64, 64, 3) and it["prompt_ids"] == TOK.encode_prompt(it["prompt"])
               for it in batch)
    for bad in ({"image_size": 48}, {"image_size": 0}):
        with pytest.raises(ValueError, match="image_size a multiple of 32 and >= 32"):
            data.eval_items(cfg_for(source="see_hear", **bad))
    with pytest.raises(ValueError, match="tone_seconds >= 0.02"):
        data.eval_items(cfg_for(source="see_hear", tone_seconds=0.0))


def _write_wav(path, x_TC, rate, width, channels=None):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels or x_TC.shape[1])
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(x_TC.tobytes())


def test_jsonl_with_images_and_audio(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "media").mkdir()
    cat_HWC = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(cat_HWC).save(tmp_path / "media" / "cat.png")
    see_through = np.zeros((4, 4, 4), np.uint8)  # fully transparent black: white once loaded
    see_through[0, 0] = (10, 20, 30, 255)
    Image.fromarray(see_through, "RGBA").save(tmp_path / "clear.png")
    t = np.arange(13230) / 44100  # 0.3 s of a stereo 16-bit 44.1 kHz chord
    pcm_TC = np.round(np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1000 * t)], 1) * 32767)
    pcm_TC = pcm_TC.astype("<i2")
    _write_wav(tmp_path / "media" / "chord.wav", pcm_TC, 44100, 2)
    rows = [{"id": "both", "prompt": "what?", "images": "media/cat.png", "audios": ["media/chord.wav"]},
            {"id": "two", "prompt": "b?", "images": [str(tmp_path / "clear.png"), "media/cat.png"]},
            {"id": "text", "prompt": "1+1=", "images": []}]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = cfg_for(source=str(path), eval_size=0)
    src = {it["id"]: it for it in data.make_prompt_source(cfg)}
    assert src["both"]["image_paths"] == [str(tmp_path / "media" / "cat.png")] and "images" not in src["both"]
    assert src["both"]["audio_paths"] == [str(tmp_path / "media" / "chord.wav")]
    assert src["two"]["image_paths"] == [str(tmp_path / "clear.png"), str(tmp_path / "media" / "cat.png")]
    assert src["text"] == {"id": "text", "prompt": "1+1=", "answer": None, "tests": None}
    assert data.load_media(src["text"]) is src["text"]

    seen = []

    def prepare(item):  # a stand-in for the multimodal one: a token per image on top of the text
        seen.append(item)
        return {"prompt_ids": TOK.encode_prompt(item["prompt"]) + [0] * len(item.get("images", ())), "n": 7}

    got = {it["id"]: it for it in next(data.PromptLoader(cfg, TOK, batch_size=3, seed=0, prepare=prepare))}
    assert len(seen) == 3 and all("image_paths" not in it and "audio_paths" not in it for it in seen)
    assert all(it["n"] == 7 for it in got.values()) and len(got["two"]["prompt_ids"]) == 1 + 2 + 2
    (image,), (audio,) = got["both"]["images"], got["both"]["audios"]
    assert image.dtype == np.uint8 and (image == cat_HWC).all()
    want = resample_poly(pcm_TC.astype(np.float64).mean(1) / 32768, 160, 441)
    assert audio.dtype == np.float32 and audio.ndim == 1 and abs(len(audio) - 0.3 * 16000) <= 1
    np.testing.assert_allclose(audio, want, atol=1e-5)
    clear, cat = got["two"]["images"]
    assert (clear[0, 0] == (10, 20, 30)).all() and (clear.reshape(-1, 3)[1:] == 255).all() and (cat == cat_HWC).all()
    # the length filter counts the ids prepare made: "both" is 1 + 5 + 1 long, "two" 1 + 2 + 2, "text" 1 + 4
    short = data.PromptLoader(cfg_for(source=str(path), eval_size=0, max_prompt_len=6), TOK, batch_size=2, seed=0,
                              prepare=prepare)
    assert {it["id"] for it in next(short)} == {"two", "text"} and short.stats["dropped_too_long"] <= 1
    # Parquet files read the same fields
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "pics": ["media/cat.png"]}]), tmp_path / "set.parquet")
    (item,) = data.make_prompt_source(cfg_for(source=str(tmp_path / "set.parquet"), image_field="pics", eval_size=0))
    assert item["image_paths"] == [str(tmp_path / "media" / "cat.png")]
    (held,) = data.eval_items(cfg_for(source=str(path), eval_size=1))  # held out with its media decoded
    assert not {"image_paths", "audio_paths"} & set(held)
    sizes = [Image.open(p).size for p in src[held["id"]].get("image_paths", [])]
    assert [im.shape for im in held.get("images", [])] == [(h, w, 3) for w, h in sizes]
    (held,) = data.eval_items(cfg_for(source=str(path), eval_size=1, image_field="", audio_field=""))
    assert not {"images", "audios"} & set(held)  # "" = no media field


@pytest.mark.parametrize("width,rate", [(1, 16000), (3, 16000), (4, 8000)])
def test_wav_sample_widths(tmp_path, width, rate):
    x_T = np.linspace(-0.9, 0.9, 800)
    scale = 2 ** (8 * width - 1)
    q_T = np.round(x_T * (scale - 1)).astype(np.int64)
    raw = {1: lambda q: (q + 128).astype(np.uint8), 4: lambda q: q.astype("<i4"),
           3: lambda q: q.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].copy()}[width](q_T)
    _write_wav(tmp_path / "x.wav", raw, rate, width, channels=1)
    (audio,) = data.load_media({"id": "w", "audio_paths": [str(tmp_path / "x.wav")]})["audios"]
    from scipy.signal import resample_poly

    want = q_T / scale if rate == 16000 else resample_poly(q_T / scale, 16000 // rate, 1)
    assert audio.dtype == np.float32 and audio.shape == (800 * 16000 // rate,)
    np.testing.assert_allclose(audio, want, atol=1e-6)


def test_media_errors_name_the_row_and_the_file(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "images": ["cat.png"]}) + "\n")
    with pytest.raises(ValueError, match=rf"set.jsonl:2: image 'cat.png' \({re.escape(str(tmp_path / 'cat.png'))}\) "
                                         r"does not exist"):
        data.make_prompt_source(cfg_for(source=str(path), eval_size=0))
    path.write_text(json.dumps({"prompt": "b", "audios": 3}) + "\n")
    with pytest.raises(ValueError, match="set.jsonl:1: field 'audios' must be a path or a list of paths"):
        data.make_prompt_source(cfg_for(source=str(path), eval_size=0))
    (tmp_path / "bad.wav").write_bytes(b"this is not a wav file at all")
    (tmp_path / "bad.png").write_bytes(b"nor is this a png")
    path.write_text(json.dumps({"id": "g1", "prompt": "b", "audios": "bad.wav"}) + "\n"
                    + json.dumps({"id": "g2", "prompt": "c", "images": "bad.png"}) + "\n")
    # the held-out item is one of the two: either fails, naming itself and its file
    with pytest.raises(ValueError, match=r"prompt 'g[12]': cannot read (audio|image) '.*bad\.(wav|png)': .+; "
                                         r"(audio|image) must be"):
        data.eval_items(cfg_for(source=str(path), eval_size=1))
    items = {it["id"]: it for it in data.make_prompt_source(cfg_for(source=str(path), eval_size=0))}
    with pytest.raises(ValueError, match=rf"prompt 'g1': cannot read audio '{re.escape(str(tmp_path / 'bad.wav'))}'"
                                         r": .+; audio must be a PCM WAV file"):
        data.load_media(items["g1"])
    with pytest.raises(ValueError, match=r"prompt 'g2': cannot read image '.*bad\.png': .+; image must be"):
        data.load_media(items["g2"])
    empty = tmp_path / "empty.wav"
    _write_wav(empty, np.zeros((0, 1), "<i2"), 16000, 2)
    with pytest.raises(ValueError, match="cannot read audio .*empty.wav': no samples"):
        data.load_media({"id": "e", "audio_paths": [str(empty)]})
    (tmp_path / "cut.wav").write_bytes(b"RIFF")  # cut short: wave raises a bare EOFError, whose text is empty
    with pytest.raises(ValueError, match="cannot read audio .*cut.wav': EOFError; audio must be a PCM WAV file"):
        data.load_media({"id": "c", "audio_paths": [str(tmp_path / "cut.wav")]})
