"""Text tokenizer interface, the built-in deterministic byte-level tokenizer, and a Hugging Face one.

`ByteTokenizer` maps UTF-8 bytes to ids 0..255 and puts the special tokens at `special_token_offset + i`,
so it fits any vocabulary of at least offset + 8 ids (512 by default): the tiny recipes and synthetic data. Qwen's
chat templates' turn tokens ("<|im_start|>", "<|im_end|>") follow at offset + 8 and + 9 where the vocabulary holds
them (`token_id`), so that a text that spells one (its bytes) is not the turn token.

`HFTokenizer` reads a Hugging Face tokenizer directory (its `tokenizer.json`, e.g. the Qwen3-30B-A3B
checkpoint's own directory) with the `tokenizers` library, and takes the document's special tokens from
Qwen-VL's names (`QWEN_VL_SPECIAL_TOKENS`): the ids a model started from Qwen3 / Keye-VL weights was trained
with. Nothing is downloaded. Any other tokenizer can be dropped in by implementing `Tokenizer` (`encode`,
`decode` and the special-id attributes; optionally `token_id`, below) and passing it to `VideoPackedLoader`.

A record's text is scraped text and may spell a special token ("<|im_end|>" in an answer about Qwen's template,
"<|vision_start|>" on a page about Qwen-VL): `HFTokenizer.encode` reads it as text, never as that token (transformers'
`split_special_tokens=True`), so raw text yields no control or vision id. Only the chat template's own turn tokens
become ids, by `token_id` (`annotations.Control`, `packing._encode_joined`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

SPECIAL_TOKENS = (
    "pad", "bos", "eos", "vision_start", "vision_end", "image_pad", "video_pad", "frame_ts",
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data path needs from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int | None  # None: documents start without one (Qwen's pretraining text has no BOS)
    eos_id: int
    vision_start_id: int
    vision_end_id: int
    image_pad_id: int
    video_pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


QWEN_CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")     # what chat_template "qwen" writes around each turn


class ByteTokenizer:
    """UTF-8 bytes -> ids 0..255; special tokens at `offset + SPECIAL_TOKENS.index(name)`; the chat templates' turn
    tokens at `offset + len(SPECIAL_TOKENS) + QWEN_CHAT_TOKENS.index(token)` where vocab_size holds them."""

    # a chat template's turn tokens are ids of their own (plan field of that name; plans made when the byte tokenizer
    # wrote them as their bytes lack it: the loader's _same_plan_before)
    turn_tokens = "ids"

    def __init__(self, *, vocab_size: int = 512, special_token_offset: int = 256) -> None:
        if special_token_offset < 256:
            raise ValueError(f"special_token_offset = {special_token_offset}: must be >= 256")
        if vocab_size < special_token_offset + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size = {vocab_size}: must be >= "
                             f"{special_token_offset + len(SPECIAL_TOKENS)}")
        self.vocab_size = vocab_size
        self.special_token_offset = special_token_offset
        for i, name in enumerate(SPECIAL_TOKENS):
            setattr(self, f"{name}_id", special_token_offset + i)
        self._special = {special_token_offset + i: f"<{n}>" for i, n in enumerate(SPECIAL_TOKENS)}
        first = special_token_offset + len(SPECIAL_TOKENS)
        self._turn = {t: first + i for i, t in enumerate(QWEN_CHAT_TOKENS) if first + i < vocab_size}
        self._special.update({i: t for t, i in self._turn.items()})

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_id(self, token: str) -> int | None:
        """The id of a chat template's turn token ("<|im_start|>"), None for any other text or where vocab_size has no
        room for it (build_tokenizer refuses a chat template then)."""
        return self._turn.get(token)

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            out.append(self._special.get(i, f"<unk:{i}>"))
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, special_token_offset={self.special_token_offset})"


# The document's special tokens in a Hugging Face tokenizer, by Qwen-VL's names (Qwen2.5 / Qwen3 tokenizers hold
# them: <|endoftext|> 151643, <|vision_start|> 151652, <|vision_end|> 151653, <|image_pad|> 151655,
# <|video_pad|> 151656). A document ends with <|endoftext|>, as Qwen's pretraining text does, and padding uses the
# same id (it is never a label: padding is a segment of its own with a zero loss mask). No BOS.
QWEN_VL_SPECIAL_TOKENS = {
    "eos": "<|endoftext|>", "pad": "<|endoftext|>", "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>", "image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>",
}


# the tokens each chat template writes, which the tokenizer must hold as single ids (Qwen3's adds its thinking block)
CHAT_TOKENS = {"qwen": QWEN_CHAT_TOKENS, "qwen3": QWEN_CHAT_TOKENS + ("<think>", "</think>")}


def hf_tokenizer_file(path: str | os.PathLike) -> Path:
    """`path`'s tokenizer.json (path: a Hugging Face model or tokenizer directory, or the file itself); raises
    ValueError naming the path when there is none."""
    p = Path(path).expanduser()
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file() or f.name != "tokenizer.json":
        why = "no such directory" if not p.exists() else "holds no tokenizer.json (a fast Hugging Face tokenizer)"
        raise ValueError(f"data.video.tokenizer = {str(path)!r}: {why}; give 'bytes' or the directory of a "
                         f"Hugging Face tokenizer, e.g. the Qwen3-30B-A3B checkpoint's")
    return f


class HFTokenizer:
    """A Hugging Face fast tokenizer (tokenizer.json) with Qwen-VL's special tokens. encode never adds special
    tokens, and reads a text that spells one ("<|im_end|>") as that text, as transformers does with
    `split_special_tokens=True` (added tokens that are not special, such as Qwen3's "<think>", stay words of the
    vocabulary, as there); decode keeps them. `token_id` gives a special token's id, for what a chat template writes."""

    # how a text that spells one of the tokenizer's special tokens is read (the loader's plan field of that name): as
    # its characters. Plans made when such a text gave the token's id lack the field (the loader's _same_plan_before)
    specials_in_text = "text"

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as _HF

        self.path = hf_tokenizer_file(path)
        self._tok = _HF.from_file(str(self.path))
        self._read_text_as_text()
        self.special_tokens = tuple(sorted(t.content for t in self._tok.get_added_tokens_decoder().values()
                                           if t.special))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = None
        for name, token in QWEN_VL_SPECIAL_TOKENS.items():
            i = self._tok.token_to_id(token)
            if i is None:
                raise ValueError(f"data.video.tokenizer: {self.path} has no {token!r} token, which the video "
                                 f"documents use as {name} (the special tokens they need: "
                                 f"{sorted(set(QWEN_VL_SPECIAL_TOKENS.values()))})")
            setattr(self, f"{name}_id", i)

    def _read_text_as_text(self) -> None:
        """A text's special tokens are its characters (the class docstring), and so are the tokens the documents
        write by id (Qwen-VL's and the chat templates' own), also where the tokenizer adds them as plain added tokens
        (`tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"])`, as SFT scripts add chat tokens): they are marked
        special here, with the same ids."""
        from tokenizers import AddedToken

        own = set(QWEN_VL_SPECIAL_TOKENS.values()) | set(QWEN_CHAT_TOKENS)
        plain = [t for t in self._tok.get_added_tokens_decoder().values() if t.content in own and not t.special]
        if plain:
            self._tok.add_special_tokens([AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip,
                                                     rstrip=t.rstrip, normalized=t.normalized, special=True)
                                          for t in plain])
        self._tok.encode_special_tokens = True

    def __setstate__(self, state: dict) -> None:
        # a pickled tokenizers.Tokenizer (a DataLoader worker's, a tokenize_text process's) comes back reading the
        # special tokens in a text again: its encode_special_tokens is not part of what it pickles
        self.__dict__.update(state)
        self._read_text_as_text()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int | None:
        """The id of `token` as one token of the vocabulary (a chat template's "<|im_start|>"), None without one."""
        return self._tok.token_to_id(token)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """encode, with each token's span of `text` (start, end) in characters."""
        e = self._tok.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode of each text, on the tokenizers library's threads (launch/tokenize_text.py)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def build_tokenizer(cfg) -> Tokenizer:
    """The tokenizer a `VideoDataConfig` names: "bytes", or a Hugging Face tokenizer directory."""
    if cfg.tokenizer == "bytes":
        tok = ByteTokenizer(vocab_size=cfg.vocab_size, special_token_offset=cfg.special_token_offset)
        template = getattr(cfg, "chat_template", "plain")
        if template in CHAT_TOKENS and len(tok._turn) < len(QWEN_CHAT_TOKENS):
            need = cfg.special_token_offset + len(SPECIAL_TOKENS) + len(QWEN_CHAT_TOKENS)
            raise ValueError(f"data.video.chat_template={template} writes {QWEN_CHAT_TOKENS}, which the byte "
                             f"tokenizer holds at ids {need - 2} and {need - 1}: data.video.vocab_size = "
                             f"{cfg.vocab_size} must be >= {need} (or chat_template=plain)")
        return tok
    tok = HFTokenizer(cfg.tokenizer)
    template = getattr(cfg, "chat_template", "plain")
    if template in CHAT_TOKENS:
        missing = [t for t in CHAT_TOKENS[template] if tok._tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"data.video.chat_template={template} writes {CHAT_TOKENS[template]}, but "
                             f"data.video.tokenizer = {cfg.tokenizer!r} has no {missing[0]!r}: give a "
                             f"{'Qwen3' if template == 'qwen3' else 'Qwen'} tokenizer, or chat_template=plain")
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"data.video.tokenizer = {cfg.tokenizer!r} has {tok.vocab_size} ids, more than "
                         f"data.video.vocab_size = {cfg.vocab_size} (the model's embedding rows must cover them)")
    return tok
