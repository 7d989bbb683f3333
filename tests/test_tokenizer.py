"""Tokenizers: a tiny BPE saved with save_pretrained and loaded back; the character tokenizer."""

import json

import pytest
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, decoders, trainers

from zenjax.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]


def _save_bpe(directory, *, chat_template=TEMPLATE, pad=True, generation_eos=None):
    core = tokenizers.Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = ["what is two plus three", "the answer is five", "system user assistant", "hello world 123 456"] * 20
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>" if pad else None)
    tok.chat_template = chat_template
    tok.save_pretrained(directory)
    if generation_eos is not None:
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return tok


def test_hf_tokenizer_chat_template_ids_and_round_trip(tmp_path):
    ref = _save_bpe(tmp_path, generation_eos=[0, 2])
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer)
    ids = {s: ref.convert_tokens_to_ids(s) for s in SPECIALS}
    assert tok.pad_id == ids["<|endoftext|>"] == 0
    # tokenizer eos first, then generation_config's (deduplicated, order kept)
    assert tok.eos_ids == (ids["<|im_end|>"], ids["<|endoftext|>"]) == (2, 0)
    assert tok.vocab_size == len(ref) == 300

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus three"}]
    prompt = tok.encode_prompt(messages)
    text = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is two plus three<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert tok.decode(prompt) == text
    assert prompt[0] == ids["<|im_start|>"] and prompt.count(ids["<|im_end|>"]) == 2
    # A string prompt is one user turn.
    one_turn = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok.encode_prompt("hello world")) == one_turn

    for s in ["the answer is five", "hello world 123 456", "unseen wörds ✓ and\nnew lines"]:
        ids_s = tok.encode(s)
        assert ids_s == ref.encode(s, add_special_tokens=False)
        assert tok.decode(ids_s) == s
    # decode skips pad and nothing else
    five = tok.encode("five")
    assert tok.decode([tok.pad_id, *five, ids["<|im_end|>"], tok.pad_id]) == "five<|im_end|>"


def test_hf_tokenizer_without_pad_or_template(tmp_path):
    _save_bpe(tmp_path, chat_template=None, pad=False)
    tok = load_tokenizer(str(tmp_path))
    assert tok.eos_ids == (2,) and tok.pad_id == 2  # pad falls back to eos
    assert tok.decode(tok.encode_prompt("hello world")) == "hello world"  # a base model: text as is
    with pytest.raises(ValueError, match="chat template"):
        tok.encode_prompt([{"role": "user", "content": "hi"}])


def test_char_tokenizer():
    tok = load_tokenizer("char")
    assert isinstance(tok, CharTokenizer)
    assert tok.vocab_size <= 64 and tok.pad_id == 0 and tok.eos_ids == (2,)
    assert tok.encode("12+7=") == [4, 5, 13, 10, 17]  # digits start at 3; '+' is the 11th symbol
    for s in ["3+5=8", "rev 382=283", "(12-4)*3 = 24", "count a in banana:3"]:
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode_prompt("3+5=") == [1, 6, 13, 8, 17]
    assert tok.encode_prompt([{"role": "user", "content": "1+1="}]) == [1, 4, 13, 4, 17]
    assert tok.decode([1, 6, 13, 8, 17, 11, 2, 0, 0]) == "3+5=8"
    with pytest.raises(ValueError, match="'Q'"):
        tok.encode("Q")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([999])


def test_load_tokenizer_rejects_unknown(tmp_path):
    with pytest.raises(ValueError, match="neither 'char' nor"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "tokenizer.json").write_text('{"fake": 1}')  # a weights dir with broken tokenizer files
    with pytest.raises(ValueError, match=r"transformers cannot load its tokenizer files \(KeyError"):
        load_tokenizer(str(tmp_path))


def test_media_placeholders_open_the_user_turn(tmp_path):
    """Where Qwen3-Omni's chat template puts an image: at the start of the user's content, as special tokens."""
    ref = _save_bpe(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    media = ref.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    ids = tok.encode_prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two"}],
                            media)
    assert tok.decode(ids) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                               "<|image_pad|><|vision_end|>what is two<|im_end|>\n<|im_start|>assistant\n")
    start = ids.index(media[0])
    assert ids[start:start + 3] == media and ids.count(media[1]) == 1
    assert CharTokenizer().encode_prompt("1+1=", [60, 56, 61]) == [1, 60, 56, 61, 4, 13, 4, 17]
