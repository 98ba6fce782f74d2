"""Text tokenizer interface and the built-in deterministic byte-level tokenizer.

No tokenizer is downloaded in this project: `ByteTokenizer` maps UTF-8 bytes to ids 0..255 and puts
the special tokens at `special_token_offset + i`, so it fits any vocabulary of at least
offset + 8 ids (512 by default). A real tokenizer can be dropped in by implementing `Tokenizer`
(`encode`, `decode` and the special-id attributes) and passing it to `VideoPackedLoader`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

SPECIAL_TOKENS = (
    "pad", "bos", "eos", "vision_start", "vision_end", "image_pad", "video_pad", "frame_ts",
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data path needs from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    vision_start_id: int
    vision_end_id: int
    image_pad_id: int
    video_pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes -> ids 0..255; special tokens at `offset + SPECIAL_TOKENS.index(name)`."""

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

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

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


def build_tokenizer(cfg) -> Tokenizer:
    """The tokenizer a `VideoDataConfig` names."""
    if cfg.tokenizer == "bytes":
        return ByteTokenizer(vocab_size=cfg.vocab_size, special_token_offset=cfg.special_token_offset)
    raise ValueError(f"VideoDataConfig.tokenizer = {cfg.tokenizer!r}: unknown tokenizer")
