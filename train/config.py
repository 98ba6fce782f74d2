"""The typed schema of a whole run, registered in Hydra's ConfigStore.

Defaults here < YAML recipes under recipes/ < command-line overrides. Unknown keys and wrong types are
rejected by Hydra against these dataclasses (a key added with `+` by `to_config`); value checks live in each
dataclass's __post_init__ (run when `to_config` converts the composed config) and raise ValueError naming the key.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from data.held_out import parse_set_batches
from data.synthetic_tokens import DataConfig
from models.config import ModelConfig
from parallel.layout import ParallelConfig

LR_SCHEDULES = ("cosine", "wsd", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")


OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


class SettingsError(ValueError):
    """A setting found wrong once the run's process groups exist, where the launcher's checks before them cannot
    look (what an init_from checkpoint holds, the device): train/launch.py stops it as a config error, exit 2."""


@dataclass
class CheckpointConfig:
    enabled: bool = True  # false: never write checkpoints (benchmarks, parity tests)
    save_interval: int = 50  # steps between checkpoints; a checkpoint is also written at the end
    keep_last: int = 2  # complete checkpoints kept (older ones are deleted after a newer one commits)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    async_save: bool = False  # write shards in a forked writer while training continues
    resume: bool = True  # continue from the newest complete checkpoint in the run directory; false: refuse a
    # directory that holds one (train/launch.check_resume)
    init_from: str = ""  # a checkpoint directory (or a Hugging Face Qwen3-MoE directory) to start from
    # The vision tower's source when it is not init_from's (a Keye-VL Hugging Face directory, or a run or import
    # holding vision.* tensors), e.g. Keye-VL-1.5's ViT beside a Qwen3-30B-A3B language model. A fresh run whose
    # frozen ViT or projector neither source fills stops: it would stay at its random initialisation.
    vision_init_from: str = ""
    # How the distributed optimizer's state is stored. "dp_reshardable": each rank writes its own flat
    # shards, no gather, no host copies in the training process (fast; resumable at another DP or CP size only).
    # "fully_reshardable": gathered into per-parameter tensors (any TP/PP/EP change on resume; the gather
    # and host copies block the save: 55 s for a 2-layer Keye-30B slice on an H200, bench_checkpoint.py).
    optimizer_format: str = "dp_reshardable"

    def __post_init__(self) -> None:
        if self.save_interval < 1:
            raise ValueError(f"train.checkpoint.save_interval must be >= 1, got {self.save_interval}")
        if self.keep_last < 1:
            raise ValueError(f"train.checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if self.keep_every < 0:
            raise ValueError(f"train.checkpoint.keep_every must be >= 0, got {self.keep_every}")
        if self.enabled and self.keep_every % self.save_interval:   # only written steps can be kept
            lcm = math.lcm(self.keep_every, self.save_interval)
            warnings.warn(f"train.checkpoint.keep_every={self.keep_every} is not a multiple of train.checkpoint."
                          f"save_interval={self.save_interval}: checkpoints are written every {self.save_interval} "
                          f"steps, so those kept are the ones at multiples of {lcm}")
        if self.optimizer_format not in OPTIMIZER_FORMATS:
            raise ValueError(f"train.checkpoint.optimizer_format must be one of {OPTIMIZER_FORMATS}, "
                             f"got {self.optimizer_format!r}")


@dataclass
class TensorboardConfig:
    """TensorBoard event files (train/tensorboard.py), written by rank 0 beside metrics.jsonl: each step's numeric
    values and each evaluation's, at the step, each written to disk as it is logged, as metrics.jsonl's line is
    (TensorBoard keeps 32-bit floats; metrics.jsonl has them exact)."""
    enabled: bool = False
    # where: "" <run_dir>/tensorboard; a relative path is taken under run_dir. train.eval.only writes a run of its own
    # below it, eval_only/<launch time>
    dir: str = ""


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "keye-vl"
    mode: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline; or online/offline/disabled

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"train.wandb.mode must be auto/online/offline/disabled, got {self.mode!r}")


@dataclass
class DistillConfig:
    """KSA conversion stage 1 (train/distill.py): the dense model teaches its KSA version."""

    enabled: bool = False
    lm_weight: float = 1.0
    kl_weight: float = 5.0
    attn_weight: float = 5.0
    attn_clamp: float = 0.1

    def __post_init__(self) -> None:
        for name in ("lm_weight", "kl_weight", "attn_weight", "attn_clamp"):
            if not 0 <= getattr(self, name) < math.inf:   # nan passed a sign check: a NaN loss from the first step
                raise ValueError(f"train.distill.{name} must be a finite number >= 0, got {getattr(self, name)}")


def eval_checkpoint_steps(spec: str) -> list[int] | None:
    """train.eval.checkpoints as steps: None for "" (the newest) and "all" (every one), else the listed steps
    (ValueError naming the setting)."""
    if spec in ("", "all"):
        return None
    try:
        steps = [int(s) for s in str(spec).split(",")]
    except ValueError:
        raise ValueError(f"train.eval.checkpoints={spec!r}: give \"\" (the newest), all, or steps such as "
                         f"1000,2000") from None
    if any(s < 0 for s in steps):
        raise ValueError(f"train.eval.checkpoints={spec!r}: steps are >= 0")
    return steps


@dataclass
class EvalConfig:
    """A held-out loss during training: at the start of a fresh run, every `interval` steps and after the last
    step, the model runs forward
    only, without gradients, over `batches` global batches of held-out data, drawn from the start of that data
    each time (so every evaluation scores the same sequences; a resume at another global batch size warns that it
    scores others: held_out_moved). Held-out data: data.video.eval_shards for video
    data (a run on its own synthetic videos makes a second, smaller synthetic set), data.tokens.eval_paths for
    token files, and for synthetic text other samples of the same chain (data.sample_seed + 1). Logged as val_loss (and
    val_indexer_kl with DSA; val_kl and val_attn_mse in KSA distillation, whose teacher then runs too) on the
    console, in <run_dir>/eval.jsonl and to wandb. eval_shards / eval_paths may name several sets
    ("NAME=PATH,NAME=PATH", data/held_out.py): each is scored on its own, `batches` global batches each unless
    `set_batches` gives it its own count, and logged as val_loss/NAME (and so on) beside the values over all of
    them (each set's tokens counting as many times as it has). `batches` = 0 (or "NAME=all") scores a set whole,
    once: every sequence of its first epoch (a video set's packs; a token set's rows, the epoch's tail shorter than
    a row left out as in training), its last global batch filled up with further sequences whose tokens count for
    nothing; not for synthetic text, which has no end."""
    interval: int = 0  # steps between evaluations; 0: never
    # evaluate and train nothing: the weights of run_dir's checkpoints, or when it holds none, of
    # train.checkpoint.init_from's (one of our run directories, or a Hugging Face checkpoint: step 0); each logged at
    # its step; no optimizer state is read and no checkpoint written
    only: bool = False
    # with only: which checkpoints of that directory: "" the newest, "all" every complete one (oldest first; e.g.
    # the ones train.checkpoint.keep_every kept), or their steps: "1000,2000"
    checkpoints: str = ""
    # global batches (train.global_batch_size sequences each) per evaluation, per held-out set; 0: each set whole, once
    batches: int = 1
    # per named held-out set, its own number of global batches instead of `batches`, or all (whole): "code=4,web=all"
    set_batches: str = ""

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError(f"train.eval.interval must be >= 0 (0: no evaluation), got {self.interval}")
        if self.batches < 0:
            raise ValueError(f"train.eval.batches must be >= 1, or 0 for each held-out set whole, once; got "
                             f"{self.batches}")
        parse_set_batches(self.set_batches)  # ValueError naming the setting and the part
        eval_checkpoint_steps(self.checkpoints)
        if self.checkpoints and not self.only:
            raise ValueError(f"train.eval.checkpoints={self.checkpoints!r} names checkpoints to score with "
                             f"train.eval.only=true; this run trains (train.eval.only=false)")


@dataclass
class ProfileConfig:
    """torch.profiler over `steps` training steps from step `start` (the step numbers the log prints), on the
    ranks listed (train/profiling.py). Off while steps = 0."""
    start: int = 3  # the first profiled step: after the first steps' compiles and allocator growth
    steps: int = 0  # how many steps; 0: no profiling
    ranks: list[int] = field(default_factory=lambda: [0])
    memory: bool = False  # also record tensor allocations (profile_memory; slower, larger trace)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"train.profile.steps must be >= 0 (0: off), got {self.steps}")
        if self.start < 1:
            raise ValueError(f"train.profile.start must be >= 1 (steps count from 1), got {self.start}")
        if any(r < 0 for r in self.ranks):
            raise ValueError(f"train.profile.ranks must be rank numbers >= 0, got {list(self.ranks)}")
        if self.steps and not self.ranks:   # train/profiling.py profiles the ranks listed: none, without a word
            raise ValueError(f"train.profile.ranks is empty, so train.profile.steps={self.steps} would profile "
                             f"nothing: list the ranks to profile (e.g. [0])")


@dataclass
class SpikeConfig:
    """Gradient spikes (train/spikes.py): a step whose gradient norm before clipping (the language model's, or the
    vision tower's) exceeds `factor` x the median of that norm over the last `window` applied steps updates no
    weight. Off while factor = 0; no step is judged before `window` applied steps fill the window."""
    factor: float = 0.0  # e.g. 10; 0: off (every step is applied, as before)
    window: int = 50  # applied steps whose norms give the median
    # such steps in a row the run skips (going on with the next step's data) before it stops, naming the setting
    skip_steps: int = 5

    def __post_init__(self) -> None:
        if not (self.factor == 0 or (math.isfinite(self.factor) and self.factor > 1)):
            raise ValueError(f"train.spike.factor must be a finite number > 1, or 0 for off; got {self.factor}")
        if self.window < 1:
            raise ValueError(f"train.spike.window must be >= 1 (applied steps), got {self.window}")
        if self.skip_steps < 0:
            raise ValueError(f"train.spike.skip_steps must be >= 0, got {self.skip_steps}")


@dataclass
class BatchRampupConfig:
    """The global batch ramped up over the run's first packed sequences, as megatron's --rampup-batch-size (DeepSeek-V3:
    3072 -> 15360 sequences over its first 469B tokens): a step that begins after c sequences were consumed takes
    `start` + `increment` x floor(c / (samples / n)) of them (n = (train.global_batch_size - start) / increment
    increments), train.global_batch_size once c > samples (TrainConfig.batch_size_at). Each step's batch changes the
    micro-batches per step (gradient accumulation); train.micro_batch_size stays. Off while start = 0."""
    start: int = 0  # the first steps' global batch in packed sequences; 0: no ramp-up
    increment: int = 0  # sequences added at each increase; divides train.global_batch_size - start
    samples: int = 0  # the packed sequences consumed over the ramp (tokens / train.seq_length)

    def __post_init__(self) -> None:
        if self.start == 0:
            if self.increment or self.samples:
                warnings.warn(f"train.batch_rampup.increment={self.increment} and samples={self.samples} are ignored "
                              f"while train.batch_rampup.start=0 (no ramp-up)")
            return
        for name in ("start", "increment", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.batch_rampup.{name} must be >= 1 with a ramp-up (train.batch_rampup.start "
                                 f"{self.start}), got {getattr(self, name)}")


TRAINABLE = ("all", "summary", "indexer", "projector")
INDEXER_BACKWARD = ("local", "model")
MEMORY_CHECKS = ("error", "warn", "off")


@dataclass
class TrainConfig:
    steps: int = 100  # total optimizer steps of the run (the LR schedule spans these)
    stop_after: int = 0  # stop (with a checkpoint) after this many steps in this invocation; 0 = run to the end
    global_batch_size: int = 8
    micro_batch_size: int = 1
    seq_length: int = 256
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    # the vision tower's own peak learning rates, on train.lr's schedule (warm-up and shape), each part's floor at the
    # same share of its peak as train.min_lr of train.lr (train/optim.part_lr_bounds); null: train.lr and min_lr
    vision_lr: float | None = None  # the ViT (model.vision's SigLIP blocks)
    projector_lr: float | None = None  # the 2x2 patch-merger projector that feeds the LM
    lr_schedule: str = "cosine"
    warmup_steps: int = 10
    wsd_decay_fraction: float = 0.2  # warmup-stable-decay: share of the steps spent decaying at the end
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    grad_clip: float = 1.0   # the gradients' norm is scaled down to at most this (LM and vision tower); 0: not clipped
    precision: str = "auto"  # bf16 on GPU, fp32 on CPU
    log_interval: int = 1
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = the measured default for the device kind
    # which parameters train: all, only the KSA summary parameters (conversion stage 1), or only the DSA
    # indexers (dense warm-up)
    trainable: str = "all"
    # with trainable=indexer: "local" (each DSA layer back-propagates its KL in its forward and the step
    # runs the frozen model forward only) or "model" (the KL's gradient rides back through the frozen
    # model, as in the sparse stage: the same indexer gradients, slower; kept as the reference)
    indexer_backward: str = "local"
    # before a GPU run starts, parallel/memory.py's predicted peak per rank, with its 10% margin, against the GPU's
    # memory: "error" stops a run predicted not to fit (naming layouts that would), "warn" only logs it, "off" skips it
    memory_check: str = "error"
    # a step whose gradients hold a NaN or an Inf (anywhere in the world) never updates the weights: the run stops
    # there, naming the step and its data, unless it has skipped fewer than this many such steps in a row (it then
    # goes on to the next step's data, the skipped step counted in `skipped_steps`)
    skip_nonfinite_steps: int = 0
    # bitwise-reproducible GPU steps, run to run and across a stop / resume, at some speed cost (train/determinism.py):
    # torch's deterministic algorithms (strict), cuBLAS's fixed workspace, NCCL_ALGO=Ring, megatron's deterministic_mode
    deterministic: bool = False
    spike: SpikeConfig = field(default_factory=SpikeConfig)  # skipping steps whose gradient norm spikes
    batch_rampup: BatchRampupConfig = field(default_factory=BatchRampupConfig)  # a smaller global batch at first
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "seq_length", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.stop_after < 0:
            raise ValueError(f"train.stop_after must be >= 0, got {self.stop_after}")
        if self.skip_nonfinite_steps < 0:
            raise ValueError(f"train.skip_nonfinite_steps must be >= 0, got {self.skip_nonfinite_steps}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("lr", "min_lr", "weight_decay", "adam_eps", "peak_tflops"):
            # nan passed the sign checks below and inf the others: weight_decay=nan stopped every rank in the
            # optimizer's constructor, after the build; adam_eps=inf moved no weight, lr=inf made them inf
            # (grad_clip=inf: no clipping)
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"train.{name} must be a finite number, got {getattr(self, name)}")
        for name in ("lr", "warmup_steps", "weight_decay", "grad_clip"):   # lr 0: nothing moves; grad_clip 0: no clip
            if not getattr(self, name) >= 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.peak_tflops < 0:   # metrics.device_peak_tflops took a negative one as 0, the device's measured peak
            raise ValueError(f"train.peak_tflops must be >= 0 (0: the device's measured peak), got {self.peak_tflops}")
        for name in ("vision_lr", "projector_lr"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"train.{name} must be a finite number >= 0 (or null: train.lr), got {value}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ValueError(f"train.adam_eps must be > 0, got {self.adam_eps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must be in [0, train.lr ({self.lr})]")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) must be < train.steps ({self.steps})")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise ValueError(f"train.wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"train.trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.memory_check not in MEMORY_CHECKS:
            raise ValueError(f"train.memory_check must be one of {MEMORY_CHECKS}, got {self.memory_check!r}")
        if self.indexer_backward not in INDEXER_BACKWARD:
            raise ValueError(f"train.indexer_backward must be one of {INDEXER_BACKWARD}, got "
                             f"{self.indexer_backward!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                             f"train.micro_batch_size ({self.micro_batch_size})")
        r = self.batch_rampup
        # the ramp's settings against train.global_batch_size, train.micro_batch_size and the layout: check_batches,
        # at the point a run starts from (a run resumed past its ramp no longer takes them)
        if r.start and r.start < self.global_batch_size and not (self.global_batch_size - r.start) % r.increment:
            ramping, last = self._ramp()
            if ramping == self.steps:   # a run that never reaches its global batch
                warnings.warn(f"train.batch_rampup.samples ({r.samples}) outlasts the run: every one of its "
                              f"train.steps={self.steps} steps takes a global batch below train.global_batch_size "
                              f"({self.global_batch_size}), the last {last} (samples counts packed sequences: tokens / "
                              f"train.seq_length)")

    def batch_size_at(self, consumed_samples: int) -> int:
        """The global batch of a step that begins after `consumed_samples` packed sequences (train.batch_rampup; the
        schedule of megatron's RampupBatchsizeNumMicroBatchesCalculator): train.global_batch_size without a ramp-up."""
        r = self.batch_rampup
        if not r.start or consumed_samples > r.samples:
            return self.global_batch_size
        increments = (self.global_batch_size - r.start) // r.increment
        # floor(c / (samples / increments)) in integers: megatron's float quotient can land below a whole number
        return r.start + r.increment * (consumed_samples * increments // r.samples)

    def _ramp(self) -> tuple[int, int]:
        """(how many of the run's steps take a global batch below train.global_batch_size, at most train.steps; the
        last of those batches, 0 for none): one walk of the schedule."""
        n, consumed, last = 0, 0, 0
        while n < self.steps and (batch := self.batch_size_at(consumed)) < self.global_batch_size:
            n, consumed, last = n + 1, consumed + batch, batch
        return n, last

    def rampup_steps(self) -> int:
        """How many of the run's steps take a global batch below train.global_batch_size (train.batch_rampup's
        steps; at most train.steps)."""
        return self._ramp()[0]

    def batches_from(self, step: int = 0, consumed_samples: int = 0) -> list[tuple[int, int]]:
        """(the first step that takes it, the global batch) for each global batch of the steps after `step` steps that
        consumed `consumed_samples` packed sequences ((0, 0): a fresh run): the ramp's within train.steps, then
        train.global_batch_size's (its step: the one after the ramp)."""
        out: list[tuple[int, int]] = []
        while step < self.steps and (batch := self.batch_size_at(consumed_samples)) < self.global_batch_size:
            if not out or out[-1][1] != batch:
                out.append((step + 1, batch))
            step, consumed_samples = step + 1, consumed_samples + batch
        return out + [(step + 1, self.global_batch_size)]

    def batch_sizes(self) -> list[int]:
        """Every global batch a step of the run may take, smallest first (the ramp's, then train.global_batch_size)."""
        r = self.batch_rampup
        return list(range(r.start, self.global_batch_size, r.increment)) + [self.global_batch_size] if r.start else \
            [self.global_batch_size]

    @property
    def trained(self) -> str:
        """The parameters that train: train.trainable's set, or "none" with train.eval.only (nothing trains: no
        gradient buffer or optimizer state; train/trainer.py freezes all, parallel/memory.py counts none)."""
        return "none" if self.eval.only else self.trainable

    @property
    def indexer_step(self) -> bool:
        """The DSA warm-up's indexer-only step: the model runs forward only, each DSA layer back-propagating its
        KL in its forward (train/trainer.py; parallel/memory.py counts its memory so)."""
        return self.trainable == "indexer" and self.indexer_backward == "local"


@dataclass
class Config:
    recipe_name: str = "keye_tiny"
    run_dir: str = ""  # empty: runs/<recipe_name>, so rerunning the same command resumes
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # torch's generators take 64-bit seeds and megatron seeds its tensor- and expert-parallel streams at seed +
        # 2718 + rank; 2^32 keeps every derived seed in range (a seed of 2^64 - 1 stopped the ranks with
        # "Overflow when unpacking long long" once the process groups existed)
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2^32), got {self.seed}")

    def resolved_run_dir(self) -> str:
        return self.run_dir or f"runs/{self.recipe_name}"


# model settings a resumed run may change: how the same function is computed or trained, not what it computes
# (everything else under model.* must equal the checkpoint's; train/launch.check_resume)
MODEL_KEYS_FREE_ON_RESUME = ("name", "lm.experts_impl", "lm.loss_chunk_tokens", "lm.init_std", "lm.moe_aux_loss_coeff",
                             "lm.moe_bias_update_rate", "lm.moe_balance",
                             "lm.moe_router_dtype", "lm.max_position_embeddings", "lm.ksa.backend", "lm.dsa.backend",
                             "lm.dsa.loss_weight", "vision.init_std")


def config_changes(old: dict, new: dict, prefix: str = "", *,
                   defaults: dict | None = None) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf that differs between two nested config dicts (a key on
    one side only compares against "<absent>"). With `defaults` (asdict(Config())): a key `old` lacks whose new
    value is its default is no change (a config written before the setting existed ran as its default does)."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        d = defaults.get(k, "<absent>") if isinstance(defaults, dict) else "<absent>"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.", defaults=d if isinstance(d, dict) else None)
        elif a != b and not (a == "<absent>" and b == d):
            out.append((f"{prefix}{k}", a, b))
    return out


def register_configs() -> None:
    """Stores the schema as Hydra's `base_config`, once a process (OmegaConf.structured(Config) takes ~0.15 s, and
    code that composes configs in turn, compose_config, calls this each time)."""
    store = ConfigStore.instance()
    if "base_config.yaml" not in store.repo:
        store.store(name="base_config", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Composed Hydra config -> typed Config (runs every __post_init__ check). A key the schema does not have stops
    it too: Hydra refuses `train.lrr=1` itself, but takes `+train.lrr=1` (the form its own message suggests) and
    OmegaConf then sets it on the dataclass as an attribute nothing reads."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config), type(obj)
    added = _added_keys(obj)
    if added:
        raise ValueError(f"unknown config key{'s' if len(added) > 1 else ''} {', '.join(added)}: no setting of that "
                         f"name exists (added with '+'); `--cfg job` prints every key")
    return obj


def _added_keys(obj, path: str = "") -> list[str]:
    """The keys set on the dataclass `obj` (and those it holds) that are none of its fields, dotted."""
    from dataclasses import fields, is_dataclass

    names = {f.name for f in fields(obj)}
    out = [path + k for k in vars(obj) if k not in names]
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out += _added_keys(value, f"{path}{f.name}.")
    return out


def held_out_moved(saved: dict, t: TrainConfig) -> str:
    """For a resumed run whose checkpoint recorded the train settings `saved` and whose launch has `t`:
    "" unless another train.global_batch_size makes each evaluation score another number of each held-out set's
    sequences (train.eval.batches global batches from the set's start), else a sentence naming both counts and the
    train.eval.batches that keeps the sequences scored before, where one does. A set scored whole is the same set."""
    e, old = t.eval, saved.get("eval") or {}
    old_gbs, old_batches = saved.get("global_batch_size"), old.get("batches", e.batches)
    if not e.interval or old_gbs in (None, t.global_batch_size) or not (old_batches and e.batches):
        return ""
    before, now = old_batches * old_gbs, e.batches * t.global_batch_size
    if before == now:
        return ""
    keep = "" if before % t.global_batch_size else f"; train.eval.batches={before // t.global_batch_size} scores those"
    return (f"train.global_batch_size {old_gbs} -> {t.global_batch_size}: each evaluation scores the first {now} "
            f"sequences of each held-out set (train.eval.batches={e.batches}) where it scored {before}, so val_loss "
            f"from here on is over other sequences than before{keep}"
            + (" (the sets train.eval.set_batches names count in global batches too)" if e.set_batches else ""))


def saved_consumed_samples(common: dict, saved_config: dict | None) -> int:
    """The packed sequences a checkpoint's steps consumed, from its common state: as recorded, or for a checkpoint
    written before they were (no ramp-up then): its token stream's data position where it has one, else its steps x
    the train.global_batch_size it was saved with."""
    if "consumed_samples" in common:
        return int(common["consumed_samples"])
    data = common.get("data") or {}
    if "consumed_samples" in data:
        return int(data["consumed_samples"])
    gbs = ((saved_config or {}).get("train") or {}).get("global_batch_size", TrainConfig.global_batch_size)
    return int(common["step"]) * int(gbs)


def rampup_changed(saved: dict, t: TrainConfig, consumed: int) -> str:
    """For a resumed run whose checkpoint recorded the train settings `saved` and whose launch has `t`, after `consumed`
    packed sequences: "" unless train.batch_rampup or train.global_batch_size changed the ramp, else a sentence naming
    both and the global batch the run goes on with (the ramp is a function of the sequences consumed: the new one's
    batch at this point, whatever the old one gave)."""
    def ramp(train: dict) -> tuple:
        r = train.get("batch_rampup") or {}
        return (r.get("start", 0), r.get("increment", 0), r.get("samples", 0)) if r.get("start", 0) else (0, 0, 0)

    old, new = ramp(saved), ramp(asdict(t))
    old_gbs = saved.get("global_batch_size", t.global_batch_size)
    if old == new and (not new[0] or old_gbs == t.global_batch_size):
        return ""

    def said(r: tuple, gbs: int) -> str:
        return (f"start {r[0]}, increment {r[1]}, samples {r[2]} (to {gbs})" if r[0] else f"none (global batch {gbs})")

    return (f"train.batch_rampup changed since the checkpoint: {said(old, old_gbs)} -> "
            f"{said(new, t.global_batch_size)}; after the {consumed} sequences consumed, the next step's global batch "
            f"is {t.batch_size_at(consumed)} sequences by the new settings")


def check_batches(cfg: Config, layout, *, step: int = 0, consumed_samples: int = 0) -> None:
    """Every global batch the run takes from where it starts (after `step` steps that consumed `consumed_samples` packed
    sequences: a resumed run's checkpoint; 0, 0: a fresh run) splits as the layout (parallel/layout.ParallelLayout)
    needs: train.batch_rampup's batches still to come lead up to train.global_batch_size, each a multiple of
    train.micro_batch_size x the data-parallel size, and every batch's micro-batches per rank a multiple of
    parallel.vit.group and, with the interleaved pipeline schedule (parallel.vpp > 1), of parallel.pp. ValueError
    naming the settings, and the step and batch where one is the ramp's. A run resumed past its ramp (train.batch_rampup
    .samples consumed) is judged at train.global_batch_size alone: the ramp's settings bind no later data-parallel size,
    micro-batch or global batch."""
    t, r = cfg.train, cfg.train.batch_rampup
    gbs, mbs, dp = t.global_batch_size, t.micro_batch_size, layout.dp
    ramping = bool(r.start) and consumed_samples < r.samples and not t.eval.only
    resumed = (f" (this run resumes after step {step}, {consumed_samples} of the ramp's train.batch_rampup.samples "
               f"({r.samples}) sequences consumed)") if step and ramping else ""
    if ramping and r.start >= gbs:
        raise ValueError(f"train.batch_rampup.start ({r.start}) must be below train.global_batch_size ({gbs}), the "
                         f"batch it ramps up to (0: no ramp-up){resumed}")
    if ramping and (gbs - r.start) % r.increment:
        raise ValueError(f"train.batch_rampup.increment ({r.increment}) must divide train.global_batch_size - "
                         f"train.batch_rampup.start ({gbs} - {r.start} = {gbs - r.start}){resumed}")
    batches = t.batches_from(step, consumed_samples) if ramping else [(step + 1, gbs)]
    unit = f"train.micro_batch_size ({mbs}) x data-parallel size ({dp})"
    for name in ("start", "increment") if ramping and not step else ():   # so is then every batch of the ramp
        if getattr(r, name) % (mbs * dp):
            raise ValueError(f"train.batch_rampup.{name} ({getattr(r, name)}) must be a multiple of {unit}")
    for s, batch in batches[:-1] if step else ():    # the ramp's batches still to come
        if batch % (mbs * dp):
            raise ValueError(f"train.batch_rampup gives step {s} the global batch {batch}, which must be a multiple of "
                             f"{unit}{resumed}: resume the rest of the ramp (its batches "
                             f"{', '.join(str(b) for _, b in batches[:-1])}, to step {batches[-1][0] - 1}) at a "
                             f"data-parallel size that divides each, and change it once the ramp is over")
    group = cfg.parallel.vit.group if cfg.model.vision.enabled and cfg.data.kind == "video" else 0
    for s, batch in batches:
        per_step = batch // (mbs * dp)
        source = ("train.global_batch_size" if (s, batch) == batches[-1] else
                  f"train.batch_rampup's global batch {batch} from step {s}")
        micro = f"the micro-batches per step and data-parallel rank ({per_step} = {source} / (train.micro_batch_size " \
                f"x {dp}))"
        if group and per_step % group:
            raise ValueError(f"parallel.vit.group ({group}) must divide {micro}{resumed}")
        if layout.vpp > 1 and (group or per_step) % layout.pp:
            what = f"parallel.vit.group ({group}), the micro-batches of each round of a step," if group else micro
            raise ValueError(f"parallel.vpp ({layout.vpp}) runs megatron's interleaved pipeline schedule, which takes "
                             f"micro-batches in groups of parallel.pp ({layout.pp}): {what} must be a multiple of "
                             f"{layout.pp}{resumed}")


def ignored_on_resume(saved: dict, cfg: Config, *, rng_restored: bool) -> list[str]:
    """The settings this launch changed since the checkpoint it resumes (whose config `saved` recorded) that a resume
    does not read, each as a sentence: the `seed` where the random state is the checkpoint's (`rng_restored`: saved at
    this layout), and train.checkpoint.init_from / vision_init_from (a fresh run's starting weights)."""
    out = []
    if rng_restored and saved.get("seed", cfg.seed) != cfg.seed:
        out.append(f"seed {saved['seed']} -> {cfg.seed} changes nothing in a resumed run: its weights were initialised "
                   f"and its random state comes from the checkpoint (the data's order follows data.seed)")
    old = (saved.get("train") or {}).get("checkpoint") or {}
    for name in ("init_from", "vision_init_from"):
        source = getattr(cfg.train.checkpoint, name)
        if source and old.get(name, source) != source:
            out.append(f"train.checkpoint.{name}={source!r} is not read: this run directory holds a checkpoint, which "
                       f"the run resumes; a run that starts from those weights takes another run_dir")
    return out
