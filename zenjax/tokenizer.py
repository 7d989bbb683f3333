"""Tokenizers: a Hugging Face tokenizer from a local directory, or a tiny character tokenizer for synthetic tasks."""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Sequence

Message = dict  # {"role": str, "content": str}
Prompt = str | Sequence[Message]


class Tokenizer(abc.ABC):
    """What the rest of zenjax needs from a tokenizer."""

    vocab_size: int  # number of token ids the tokenizer can produce
    pad_id: int  # fills batches; `decode` skips it
    eos_ids: tuple[int, ...]  # any of these ends a completion

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Plain text to ids, without special tokens (completions, answers)."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; pad ids are skipped, nothing else is cut."""

    @abc.abstractmethod
    def encode_prompt(self, prompt: Prompt, media_ids: Sequence[int] = ()) -> list[int]:
        """A prompt (text or chat messages) to the ids the model continues from; `media_ids` (special tokens: the
        media placeholders) open the user's turn, before its text, where Qwen3-Omni's chat template puts them."""


def _check_messages(prompt: Prompt) -> None:
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"a chat message must be a dict with string 'role' and 'content', got {m!r}")


class CharTokenizer(Tokenizer):
    """One id per character of a small alphabet (digits, arithmetic symbols, lower-case letters)."""

    PAD, BOS, EOS = 0, 1, 2
    CHARS = "0123456789+-*/=()., <>?:\nabcdefghijklmnopqrstuvwxyz"

    def __init__(self):
        self._ids = {c: i + 3 for i, c in enumerate(self.CHARS)}
        self.vocab_size = 3 + len(self.CHARS)
        self.pad_id = self.PAD
        self.bos_id = self.BOS
        self.eos_ids = (self.EOS,)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"CharTokenizer cannot encode {e.args[0]!r} in {text!r}; "
                             f"it knows {self.CHARS!r}; pass --config.tokenizer=<an HF tokenizer dir> for other text"
                             ) from None

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens have no text; an id outside the vocabulary is a caller bug worth failing on.
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"CharTokenizer: id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i >= 3:
                out.append(self.CHARS[i - 3])
        return "".join(out)

    def encode_prompt(self, prompt: Prompt, media_ids: Sequence[int] = ()) -> list[int]:
        if not isinstance(prompt, str):
            _check_messages(prompt)
            prompt = "\n".join(m["content"] for m in prompt)
        return [self.BOS, *media_ids] + self.encode(prompt)


class HFTokenizer(Tokenizer):
    """transformers.AutoTokenizer from a local directory (no downloads).

    eos ids: the tokenizer's eos token plus every `eos_token_id` of generation_config.json (Qwen3 ends chat
    turns with <|im_end|> and base text with <|endoftext|>). pad: the tokenizer's pad token, else the first eos.
    """

    def __init__(self, path: str):
        import transformers

        if not os.path.isdir(path):
            raise ValueError(f"tokenizer directory {path!r} does not exist")
        try:
            self._tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:  # transformers' many ways to reject a file
            raise ValueError(f"{path}: transformers cannot load its tokenizer files ({type(e).__name__}: "
                             f"{' '.join(str(e).split())}); pass a tokenizer dir as --config.tokenizer") from None
        eos = [self._tok.eos_token_id] if self._tok.eos_token_id is not None else []
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                gen_eos = json.load(f).get("eos_token_id")
            eos += gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
        if not eos:
            raise ValueError(f"{path}: neither the tokenizer nor generation_config.json defines an eos token")
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos))
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_ids[0]
        self.vocab_size = len(self._tok)

    @property
    def hf(self):
        """The underlying transformers tokenizer."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id], skip_special_tokens=False)

    def encode_prompt(self, prompt: Prompt, media_ids: Sequence[int] = ()) -> list[int]:
        # A plain-text prompt becomes one user turn when there is a chat template (instruct models), and is
        # encoded as is, with the tokenizer's own special tokens, when there is none (base models). Special tokens
        # written out in the text encode to their ids.
        media = "".join(self._tok.convert_ids_to_tokens([int(i) for i in media_ids]))
        if not self._tok.chat_template:
            if not isinstance(prompt, str):
                raise ValueError("chat-message prompts need a tokenizer with a chat template; this one has none")
            return self._tok.encode(media + prompt, add_special_tokens=True)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        _check_messages(messages)
        if media:
            user = next((m for m in messages if m["role"] == "user"), None)
            if user is None:
                raise ValueError("a prompt with images or audio needs a user message to hold them")
            user["content"] = media + user["content"]
        text = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._tok.encode(text, add_special_tokens=False)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """"char" for the built-in character tokenizer, else a local Hugging Face tokenizer directory."""
    if name_or_path == "char":
        return CharTokenizer()
    if not os.path.isdir(name_or_path):
        raise ValueError(f"tokenizer {name_or_path!r} is neither 'char' nor a local tokenizer directory")
    return HFTokenizer(name_or_path)
