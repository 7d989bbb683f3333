"""Prompt sources, the held-out split and the grain-backed PromptLoader."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
