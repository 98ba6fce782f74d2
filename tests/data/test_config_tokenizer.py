"""VideoDataConfig validation and the byte-level tokenizer."""
import pytest

from data.video.config import VideoDataConfig
from data.video.tokenizer import SPECIAL_TOKENS, ByteTokenizer, Tokenizer, build_tokenizer


@pytest.mark.parametrize("field,value", [
    ("seq_len", 8), ("min_frames", 0), ("max_frames", 1), ("min_frame_tokens", 0),
    ("max_frame_tokens", 10), ("sample_fps", 0.0), ("sample_fps", float("nan")),
    ("max_video_tokens", 100), ("decode_backend", "opencv"), ("decode_isolation", "thread"),
    ("num_workers", -1), ("max_consecutive_failures", 0), ("sample_timeout_s", 0.0),
    # not finite: the decode child's wait raised OverflowError in the DataLoader worker at the first sample
    ("sample_timeout_s", float("inf")), ("batch_timeout_s", float("inf")),
    ("vocab_size", 100), ("special_token_offset", 10), ("frame_jitter", 2.0), ("num_epochs", 0),
    ("pack_lookahead", 0), ("seq_len", "8192"),
    # a token id: the supervised targets equal to it were trained as token 0 (the batch maps it to 0, the mask kept)
    ("label_ignore_index", 10),
    ("max_text_tokens", 0),   # every video's text cut away: no supervised token, loss 0
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError) as e:
        VideoDataConfig(**{field: value})
    assert field in str(e.value) and repr(value)[:6] in str(e.value)


def test_defaults_are_valid_and_keye_like():
    c = VideoDataConfig()
    assert c.sample_fps == 2.0 and (c.min_frame_tokens, c.max_frame_tokens) == (64, 256)
    assert c.frame_factor == 28 and 180_000 <= c.max_video_tokens <= 190_000
    assert c.decode_backend == "pyav"        # measured faster than decord (docs/data.md)


def test_seq_len_too_small_for_one_video():
    with pytest.raises(ValueError, match="seq_len"):
        VideoDataConfig(seq_len=200)


def test_byte_tokenizer_roundtrip_and_specials():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    s = "Caption: a cat — 猫 <0.5s>\n"
    ids = tok.encode(s)
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == s
    specials = [getattr(tok, f"{n}_id") for n in SPECIAL_TOKENS]
    assert specials == list(range(256, 256 + len(SPECIAL_TOKENS)))
    assert max(specials) < tok.vocab_size == 512
    assert tok.decode([tok.bos_id, 104, 105, tok.video_pad_id]) == "<bos>hi<video_pad>"


def test_tokenizer_ids_configurable():
    tok = build_tokenizer(VideoDataConfig(vocab_size=1024, special_token_offset=1000))
    assert tok.pad_id == 1000 and tok.video_pad_id == 1006 and tok.vocab_size == 1024
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(vocab_size=300, special_token_offset=296)
