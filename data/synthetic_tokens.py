"""A synthetic token stream with a resumable position, for the tiny recipe and the tests.

Each sample is a pure function of (seed, global sample index), so a position in the stream is one
integer (`consumed_samples`), resuming is exact, and resuming under a different data-parallel size
neither repeats nor skips a sample: step k always consumes global samples [k*G, (k+1)*G), and DP rank
r of R takes the contiguous slice r*G/R .. (r+1)*G/R of them, micro-batch by micro-batch.

The text has learnable structure so that the loss visibly falls within a few dozen steps: a sparse
Markov chain (every token has `branching` successors with fixed, skewed probabilities) plus, with
probability `copy_prob`, a repeat of an earlier span later in the sequence (rewarding attention that
looks back, i.e. induction heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data.sample_position import GlobalSamplePosition
from data.token_files import TokenFilesConfig
from data.video.config import REQUIRED, UnsetPathError, VideoDataConfig

DATA_KINDS = ("synthetic_tokens", "video", "tokens")


@dataclass
class DataConfig:
    """`data`: synthetic_tokens (a text stream made here), video (packed video + text samples from tar shards
    written by launch/ingest.py, see docs/data.md) or tokens (pre-tokenized text in megatron's indexed datasets, for
    a language model alone: data/token_files.py)."""

    kind: str = "synthetic_tokens"
    seed: int = 1234
    # synthetic text: the seed of its samples (-1: data.seed); its Markov chain is data.seed's alone. train.eval's
    # held-out text is this seed + 1: other samples of the same chain, the distribution the run trains on
    sample_seed: int = -1
    branching: int = 4
    copy_prob: float = 0.5
    # video: data.video.shards names the shard directory; empty = synthetic videos this project makes
    # itself (data.synthetic_videos of them, under <run_dir>/synthetic_videos_<count>_seed<seed>, once, then
    # reused), with data.synthetic_images images and data.synthetic_texts text-only samples among them (docs/data.md
    # "Image samples", "Text-only samples"), and videos of data.synthetic_scenes still scenes each ("Slow and
    # fast frames": set data.video.fast_frame_ratio to encode the repeated frames small)
    video: VideoDataConfig = field(default_factory=VideoDataConfig)
    tokens: TokenFilesConfig = field(default_factory=TokenFilesConfig)
    synthetic_videos: int = 24
    synthetic_texts: int = 0
    synthetic_images: int = 0
    synthetic_scenes: int = 0
    # samples to leave out of the training data: comma-separated files naming them (a run's nonfinite.jsonl, or
    # sample keys one per line; data/exclude.py), for a run resumed past samples that made a step not finite
    exclude: str = ""
    # of a spikes.jsonl record (train/spikes.py), data.exclude leaves out the whole step's data ("step") or only its
    # first suspect's samples ("suspect": the micro-batch, and its document or row, of the largest loss in the
    # replica of the largest own gradient norm)
    exclude_spikes: str = "step"

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if self.seed < 0:   # numpy's generators (token files' and videos' epoch orders) take none below 0
            raise ValueError(f"data.seed must be >= 0, got {self.seed}")
        if self.sample_seed < -1:
            raise ValueError(f"data.sample_seed must be >= 0, or -1 for data.seed; got {self.sample_seed}")
        if self.branching < 1:
            raise ValueError(f"data.branching must be >= 1, got {self.branching}")
        if not 0.0 <= self.copy_prob <= 1.0:
            raise ValueError(f"data.copy_prob must be in [0, 1], got {self.copy_prob}")
        if self.synthetic_videos < 0:
            raise ValueError(f"data.synthetic_videos must be >= 0, got {self.synthetic_videos}")
        if self.synthetic_videos + self.synthetic_texts + self.synthetic_images == 0:
            raise ValueError("data.synthetic_videos, data.synthetic_texts and data.synthetic_images are all 0: the "
                             "synthetic data would be empty")
        if self.synthetic_texts < 0:
            raise ValueError(f"data.synthetic_texts must be >= 0, got {self.synthetic_texts}")
        if self.synthetic_images < 0:
            raise ValueError(f"data.synthetic_images must be >= 0, got {self.synthetic_images}")
        if self.synthetic_scenes < 0:
            raise ValueError(f"data.synthetic_scenes must be >= 0, got {self.synthetic_scenes}")
        if self.exclude_spikes not in ("step", "suspect"):
            raise ValueError(f"data.exclude_spikes must be 'step' or 'suspect', got {self.exclude_spikes!r}")
        if self.exclude.strip() and self.kind == "synthetic_tokens":
            raise ValueError(f"data.exclude={self.exclude!r}: data.kind=synthetic_tokens draws its rows from a Markov "
                             f"chain and names no samples to leave out (data.kind=tokens or video do)")
        if self.kind == "tokens" and self.tokens.paths.strip() == REQUIRED:
            raise UnsetPathError("data.tokens.paths is required: the indexed datasets of token ids that "
                                 "launch/tokenize_text.py writes (e.g. data.tokens.paths=/data/tok/web, a prefix, a "
                                 "directory or a comma-separated list); an empty value trains on synthetic documents",
                                 ("data.tokens.paths",))
        if self.kind == "video":
            unset = {}  # setting -> what to set it to
            if self.video.shards == REQUIRED:
                unset["data.video.shards"] = ("the directory of shards written by launch/ingest.py (e.g. "
                                              "data.video.shards=/data/shards); an empty value trains on synthetic videos")
            if self.video.long_shards == REQUIRED:
                unset["data.video.long_shards"] = (
                    f"this recipe mixes long and short data (data.video.long_fraction={self.video.long_fraction}); "
                    f"set the directory of long-video shards (e.g. data.video.long_shards=/data/long_shards), or "
                    f"data.video.long_fraction=0 data.video.long_shards='' to train on data.video.shards alone")
            if unset:
                raise UnsetPathError("; and ".join(f"{k} is required: {v}" for k, v in unset.items()), tuple(unset))


def samples_seed(cfg: DataConfig) -> int:
    """The seed of the synthetic text's samples: data.sample_seed, or data.seed when that is -1."""
    return cfg.sample_seed if cfg.sample_seed >= 0 else cfg.seed


def _generator(seed: int, index: int) -> torch.Generator:
    # A distinct, reproducible stream per (seed, sample): mix with two large odd constants.
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + index * 0x85EBCA77 + 1) % (2**63 - 1))


class SyntheticTokenSource:
    """Random access to samples: `sample(i)` -> int64 tensor of seq_length + 1 tokens."""

    def __init__(self, cfg: DataConfig, *, vocab_size: int, seq_length: int):
        self.cfg, self.vocab_size, self.seq_length = cfg, vocab_size, seq_length
        g = _generator(cfg.seed, -1)
        self.sample_seed = samples_seed(cfg)
        self.successors = torch.randint(0, vocab_size, (vocab_size, cfg.branching), generator=g)
        probs = torch.tensor([0.5 ** i for i in range(cfg.branching)])
        self.cum_probs = (probs / probs.sum()).cumsum(0)
        self._successor_rows = self.successors.tolist()

    def sample(self, index: int) -> torch.Tensor:
        n = self.seq_length + 1
        g = _generator(self.sample_seed, index)
        choice = torch.searchsorted(self.cum_probs, torch.rand(n, generator=g)).clamp_max(self.cfg.branching - 1)
        first = int(torch.randint(0, self.vocab_size, (1,), generator=g))
        succ, ch = self._successor_rows, choice.tolist()
        walk = [first]
        for i in range(1, n):  # plain Python ints: ~50x faster than indexing tensors element by element
            walk.append(succ[walk[-1]][ch[i]])
        toks = torch.tensor(walk, dtype=torch.long)
        if n >= 32 and torch.rand(1, generator=g).item() < self.cfg.copy_prob:
            span = int(torch.randint(8, max(9, n // 4), (1,), generator=g))
            src = int(torch.randint(0, n // 2 - span + 1, (1,), generator=g)) if n // 2 > span else 0
            dst = int(torch.randint(n // 2, n - span + 1, (1,), generator=g))
            toks[dst:dst + span] = toks[src:src + span].clone()
        return toks


class SyntheticTokenStream(GlobalSamplePosition):
    """Micro-batches of one data-parallel rank; `state_dict()` holds the global position (data/sample_position.py).

    Each yielded micro-batch: tokens/labels/position_ids [mbs, s] int64, loss_mask [mbs, s] float32.
    """

    kind, what = "synthetic_tokens", "a synthetic_tokens stream"

    def __init__(self, cfg: DataConfig, *, vocab_size: int, seq_length: int, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int, dp_size: int):
        super().__init__(micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, dp_rank=dp_rank,
                         dp_size=dp_size)
        self.source = SyntheticTokenSource(cfg, vocab_size=vocab_size, seq_length=seq_length)

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.next_start()
        seqs = torch.stack([self.source.sample(i) for i in range(start, start + self.mbs)])
        s = seqs.shape[1] - 1
        return {
            "tokens": seqs[:, :-1].contiguous(),
            "labels": seqs[:, 1:].contiguous(),
            "loss_mask": torch.ones(seqs.shape[0], s, dtype=torch.float32),
            "position_ids": torch.arange(s).unsqueeze(0).expand(seqs.shape[0], -1).contiguous(),
        }
