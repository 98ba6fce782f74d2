"""Throughput / MFU accounting, the console progress line, wandb and TensorBoard (rank 0 only).

FLOPs are counted analytically (models.config.lm_flops_per_token): 6 x active matmul parameters per
token (forward + backward; the input embedding lookup excluded) plus attention, 6 * 2 * q_dim per (query,
key) pair each layer attends: every causal pair for dense attention, the top-k keys of each query (and the
indexer's scores) for DSA, the pairs of its mask (and the summary slots' tokens) for KSA; a stage that trains
part of the model (train.trainable) computes no weight gradient for the rest, and the DSA warm-up's step with
the local indexer backward runs the model forward only; a multimodal step adds its vision tower's FLOPs
(frames encoded, train/vision.py step_flops). MFU = achieved FLOP/s per device / the device's peak. The
default peak is the measured bf16 dense matmul rate of the device kind (H100/H200: 775 TFLOP/s,
measured on an H200 with torch 2.11); CPU runs report no MFU unless `train.peak_tflops` is set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from data.exclude import superseded_path
from train.loss_groups import KIND_KEY, SOURCE_KEY, is_group_key

log = logging.getLogger("train")

MEASURED_PEAK_TFLOPS = {"H200": 775.0, "H100": 775.0}


def device_peak_tflops(configured: float) -> float | None:
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in MEASURED_PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


@dataclass
class StepStats:
    step: int
    loss: float
    grad_norm: float
    lr: float
    seconds: float
    tokens: int
    extra: dict = field(default_factory=dict)  # further reported losses (e.g. distillation terms)
    flops: float = 0.0  # model FLOPs of the step beyond the LM's per-token count (the vision tower's)


def wandb_used(enabled: bool, mode: str) -> bool:
    """Whether a run logs to wandb (train.wandb.enabled, train.wandb.mode, and WANDB_MODE=disabled in the
    environment)."""
    return enabled and mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled"


def groups_line(values: dict) -> str:
    """The step line's form of a step's loss per source and kind (train/loss_groups.py), after its loss:
    ` | src short 2.31 long 2.45 | kind video 2.40 text 2.10`, each only where more than one source or kind had loss
    tokens in the step (a one-source text run's line is unchanged); their token counts are in metrics.jsonl alone."""
    out = ""
    for key, word in ((SOURCE_KEY, "src"), (KIND_KEY, "kind")):
        got = [(k.split("/", 1)[1], v) for k, v in values.items() if k.startswith(key + "/")]
        if len(got) > 1:
            out += f" | {word} " + " ".join(f"{name} {shown(v)}" for name, v in got)
    return out


def shown(value: float) -> str:
    """A logged value as the console and rank logs show it: 4 decimals, or 4 significant digits below 0.001, where 4
    decimals showed a KSA distillation's attention MSE (~4e-5 for the tiny recipe) as 0.0000 on every line."""
    return f"{value:.4f}" if value == 0 or not math.isfinite(value) or abs(value) >= 1e-3 else f"{value:.3e}"


class Meter:
    def __init__(self, *, flops_per_token: float, world_size: int, peak_tflops: float | None, total_steps: int):
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak_tflops
        self.total_steps = total_steps
        self.wandb = None
        self.tensorboard = None   # train/tensorboard.py TensorBoardLog

    def rates(self, s: StepStats) -> dict:
        tok_s = s.tokens / max(s.seconds, 1e-9)
        tflops = (self.flops_per_token * s.tokens + s.flops) / max(s.seconds, 1e-9) / self.world_size / 1e12
        out = {"loss": s.loss, "grad_norm": s.grad_norm, "lr": s.lr, "step_time_s": s.seconds,
               "tokens_per_s": tok_s, "tflops_per_device": tflops, **s.extra}
        if self.peak:
            out["mfu"] = tflops / self.peak
        if torch.cuda.is_available():
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return out

    def line(self, s: StepStats) -> str:
        r = self.rates(s)
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        mem = f" | mem {r['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in r else ""
        extra = "".join(f" | {k} {v}" if isinstance(v, int) else f" | {k} {shown(v)}" for k, v in s.extra.items()
                        if not is_group_key(k))
        return (f"step {s.step:>6}/{self.total_steps} | loss {s.loss:.4f}{groups_line(s.extra)}{extra} | "
                f"grad {s.grad_norm:.3f} | lr {s.lr:.2e} | "
                f"{r['tokens_per_s']:,.0f} tok/s | {r['tflops_per_device']:.2f} TFLOP/s/dev | MFU {mfu} | "
                f"{s.seconds:.2f} s/step{mem}")

    def start_wandb(self, *, enabled: bool, mode: str, project: str, run_dir: str, name: str, config: dict,
                    eval_only: bool = False) -> None:
        """The run directory's wandb run, resumed under its stable id (wandb_id.txt), in a group of that id. With
        eval_only (train.eval.only), a run of its own in that group instead: wandb ignores a value logged at a
        step below the run's last, so checkpoints scored after the training logged later steps would be lost in
        the training's run; and the training may still be writing to it."""
        if not wandb_used(enabled, mode):
            return
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        import wandb

        group = _wandb_id(run_dir)
        if eval_only:
            import uuid

            kw = {"id": uuid.uuid4().hex[:12], "name": f"{name} eval", "job_type": "eval", "resume": "never"}
        else:
            kw = {"id": group, "name": name, "job_type": "train", "resume": "allow"}
        self.wandb = wandb.init(project=project, dir=run_dir, mode=mode, config=config, group=group, **kw)

    def start_tensorboard(self, logdir: str, *, purge_step: int | None) -> None:
        """train.tensorboard: this launch's event file in `logdir` (train/tensorboard.py), its restart marker at
        `purge_step` (None: none)."""
        from train.tensorboard import TensorBoardLog

        self.tensorboard = TensorBoardLog(logdir, purge_step=purge_step)
        log.info("TensorBoard: %s (tensorboard --logdir %s)", self.tensorboard.path, logdir)

    def close_tensorboard(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def log(self, s: StepStats, rates: dict, *, console: bool) -> None:
        """A step's values (`rates`: rates(s), as metrics.jsonl records them) to wandb and TensorBoard, every step;
        with console, its progress line too (every train.log_interval steps)."""
        if console:
            log.info(self.line(s))
        if self.wandb is not None:
            self.wandb.log(rates, step=s.step)
        if self.tensorboard is not None:
            self.tensorboard.scalars(s.step, rates, group="train")

    def log_eval(self, step: int, values: dict) -> None:
        """One evaluation's line: its values, then how many held-out sequences (val_sequences) it took how long."""
        scores = " | ".join(f"{k} {shown(v)}" for k, v in values.items()
                            if k not in ("val_seconds", "val_sequences") and "_tokens/" not in k)  # in eval.jsonl
        # the process's peak so far, as a step's line gives it: in train.eval.only, the evaluation's own
        mem = f" | mem {torch.cuda.max_memory_allocated() / 1e9:.1f} GB" if torch.cuda.is_available() else ""
        log.info("eval   %6d/%d | %s | %d held-out sequences in %.2f s%s", step, self.total_steps, scores,
                 values.get("val_sequences", 0), values.get("val_seconds", 0.0), mem)
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.tensorboard is not None:
            self.tensorboard.scalars(step, values, group="eval")

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        self.close_tensorboard()


NONFINITE_FIELD = "nonfinite"   # a record's field naming its values that were NaN or infinite (json_record)


def json_record(rec: dict) -> str:
    """One line of a run's record files (metrics.jsonl, eval.jsonl, nonfinite.jsonl), strict JSON: a value that is
    NaN or infinite (a skipped step's loss and grad_norm) is written as null, and the field "nonfinite" names each
    such value and what it was ({"loss": "nan", "grad_norm": "inf"}; a nested value by its keys joined with dots),
    so a parser that rejects NaN reads every line and nothing is lost (read_record gives the floats back). Python's
    json writes a bare NaN, which JSON has no word for."""
    which: dict[str, str] = {}

    def clean(v, path):
        if isinstance(v, float) and not math.isfinite(v):
            which[path] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{path}.{k}" if path else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, f"{path}.{i}") for i, x in enumerate(v)]
        return v

    out = clean(rec, "")
    if which:
        out[NONFINITE_FIELD] = which
    return json.dumps(out, allow_nan=False)


def read_record(line: str) -> dict:
    """A line json_record wrote, with its non-finite values as floats again (NaN, inf, -inf) and without the field
    that names them (an older line's bare NaN reads as NaN too)."""
    rec = json.loads(line)
    for path, kind in rec.pop(NONFINITE_FIELD, {}).items():
        if path in rec:   # a top-level value (its name may hold a dot)
            rec[path] = float(kind)
            continue
        *outer, last = path.split(".")
        node = rec
        for k in outer:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if isinstance(node, list):
            node[int(last)] = float(kind)
        else:
            node[last] = float(kind)
    return rec


NONFINITE_RECORDS = "nonfinite.jsonl"   # a line per non-finite step (train/nonfinite.py record_nonfinite_step)
SPIKE_RECORDS = "spikes.jsonl"   # a line per step whose gradient norm spiked (train/spikes.py record_spike_step)


def set_aside_redone(run_dir: str, step: int) -> list[str]:
    """A launch that starts at `step` (the checkpoint it resumes, or 0) trains the steps after it again: the records
    of those steps in run_dir's metrics.jsonl, eval.jsonl and nonfinite.jsonl (train/nonfinite.py), logged by a
    launch that stopped before its next checkpoint, move to <name>.superseded.jsonl, so each record file reads as
    one run and nothing logged is lost (a launch at step 0 starts the run over: its evaluation at step 0 moves too). A
    line that is not JSON (a write cut short by a kill) moves too; train.eval.only's lines stay (they score
    checkpoints that exist). Appended there before the file is rewritten, so a crash in between leaves a record
    twice, never nowhere. Returns a note per file changed."""
    notes = []
    for name in ("metrics.jsonl", "eval.jsonl", NONFINITE_RECORDS, SPIKE_RECORDS):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            lines = f.read().splitlines(keepends=True)
        keep, moved = [], []
        for line in lines:
            try:
                rec = json.loads(line)
                later = (rec["step"] > step or step == 0) and not rec.get("eval_only", False)
            except (ValueError, KeyError, TypeError):
                later = True
            (moved if later else keep).append(line if line.endswith("\n") else line + "\n")
        if not moved:
            continue
        aside = superseded_path(path)
        with open(aside, "a") as f:
            f.writelines(moved)
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
        which = "of the run it starts over" if step == 0 else f"after step {step}"
        notes.append(f"{name}: {len(moved)} record(s) {which}, which this launch trains again, moved to "
                     f"{os.path.basename(aside)}")
    return notes


def _wandb_id(run_dir: str) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    path = os.path.join(run_dir, "wandb_id.txt")
    if os.path.exists(path):
        return open(path).read().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(run_id)
    return run_id


class Timer:
    def __init__(self):
        self.t0 = 0.0

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - self.t0


def sum_over_world(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Vectors of a step's metrics (the loss, the routers' counts, the loaders' table) summed over the world in one
    float64 all-reduce (exact for counts below 2^53) and copied to the host once: a step waits on one collective
    and one device-to-host copy, not on one of each per kind of metric. Collective over the world: every rank
    passes vectors of the same sizes in the same order. Without a process group each vector is its own sum."""
    sizes = [p.numel() for p in parts]
    flat = torch.cat([p.to(device, torch.float64).flatten() for p in parts])
    if dist.is_initialized():
        dist.all_reduce(flat)
    return list(flat.cpu().split(sizes))


# wait, failed, image samples, text-only samples, video frames, fast frames, continued text pieces, samples left out
# (data.exclude), frames and images decoded, decode seconds; then packs and tokens per mixture source
_DATA_COLS = 10


def data_metrics_table(local: dict, *, device: torch.device, sources: dict | None = None) -> torch.Tensor:
    """This rank's row of the loaders' table (data_metrics_from_table), in a [world x (8 + 2 x sources)] vector
    whose other rows are zero: summed over the world it holds every rank's row."""
    names = sorted(sources or {})
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    table = torch.zeros(world, _DATA_COLS + 2 * len(names), dtype=torch.float64)
    table[rank, 0] = float(local["data_wait_s"])
    table[rank, 1] = float(local.get("data_samples_failed", 0))
    table[rank, 2] = float(local.get("data_samples_image", 0))
    table[rank, 3] = float(local.get("data_samples_text", 0))
    table[rank, 4] = float(local.get("data_frames_video", 0))
    table[rank, 5] = float(local.get("data_frames_fast", 0))
    table[rank, 6] = float(local.get("data_texts_continued", 0))
    table[rank, 7] = float(local.get("data_samples_excluded", 0))
    table[rank, 8] = float(local.get("data_frames_decoded", 0))
    table[rank, 9] = float(local.get("data_decode_s", 0.0))
    for i, name in enumerate(names):
        table[rank, _DATA_COLS + 2 * i] = float(sources[name]["packs"])
        table[rank, _DATA_COLS + 1 + 2 * i] = float(sources[name]["tokens"])
    return table.flatten().to(device)


def data_metrics_from_table(local: dict, table: torch.Tensor, *, dp_group, sources: dict | None = None) -> dict:
    """A step's loader metrics over the whole job from the world's sum of data_metrics_table (this rank's
    VideoBatchStream or TokenFileStream step_metrics in `local`; every rank passes its table once per step, with
    the same mixture sources):

    - `data_wait_s`: the longest wait of any rank (the step's collectives wait for the slowest loader), and
      `data_wait_rank`, the rank it was (the lowest of equal ones): a stalling node shows by its rank.
    - `data_samples_failed`: the samples skipped as unreadable since the run began, summed over this rank's
      data-parallel group. Each replica reads its own part of the data, and a replica's tensor, context and
      pipeline ranks read the same part, so the sum over one group counts each failure once.
    - `data_samples_image`, `data_samples_text`: the image and text-only samples trained on since the run began,
      summed the same way; present once the job has served any (a video-only run's log is unchanged).
    - `data_fast_frame_share`: of the video frames trained on since the run began, the share encoded as fast
      frames (slow and fast frames), over the same group; present once the job has served a fast frame.
    - `data_texts_continued`: text-only documents that continued a text longer than a sequence (its pieces after
      the first) since the run began, summed the same way; present once the job has served one.
    - `data_samples_excluded`: the samples data.exclude named that the job's packs left out since the run began
      (token files: the left-out pieces their rows held), summed the same way; present once the job has left one
      out.
    - `data_frames_decoded`, `data_decode_s`: the video frames and images the loaders of the whole world decoded
      since this launch began (each rank's own work, not state), and the seconds they spent reading and decoding
      them (wall time in their DataLoader workers); present once any rank has decoded one. With
      parallel.vit.decode_once a replica's frames are decoded by one of its ranks, under the replicated ViT layout by
      each LM-input rank, else by each of them.
    - with a mixture (`sources`: the loader's per-source counts since the run began, `stats["sources"]`),
      `data_<source>_seq_share` and `data_<source>_token_share` from the packs and real tokens summed over the
      same group: the long:short ratio the whole job was served.
    `data_samples_failed` only where `local` has it (the video loader; token files fail no sample). Without a
    process group, `local` as it is (the fast frames as their share)."""
    if not dist.is_initialized():
        out = {k: v for k, v in local.items() if k not in ("data_frames_video", "data_frames_fast")}
        if local.get("data_frames_fast"):
            out["data_fast_frame_share"] = local["data_frames_fast"] / max(local.get("data_frames_video", 0), 1)
        return out
    names = sorted(sources or {})
    table = table.view(dist.get_world_size(), _DATA_COLS + 2 * len(names))
    wait_rank = int(table[:, 0].argmax())  # first occurrence of the maximum
    replicas = table[dist.get_process_group_ranks(dp_group)].sum(dim=0)
    out = {**local, "data_wait_s": float(table[wait_rank, 0]), "data_wait_rank": wait_rank}
    if "data_samples_failed" in local:   # a loader that can fail a sample: the video loader (always given there)
        out["data_samples_failed"] = int(replicas[1])
    world = table.sum(dim=0)
    for col, key in ((2, "data_samples_image"), (3, "data_samples_text"), (6, "data_texts_continued"),
                     (7, "data_samples_excluded")):
        out.pop(key, None)
        if world[col] > 0:  # the same decision on every rank: from the world's sum
            out[key] = int(replicas[col])
    out.pop("data_frames_video", None)
    out.pop("data_frames_fast", None)
    out.pop("data_frames_decoded", None)
    out.pop("data_decode_s", None)
    if world[8] > 0:   # every rank's own decoding, over the world: a replica decoding once counts each frame once
        out["data_frames_decoded"] = int(world[8])
        out["data_decode_s"] = float(world[9])
    if world[5] > 0:
        out["data_fast_frame_share"] = float(replicas[5] / replicas[4].clamp_min(1))
    packs, tokens = replicas[_DATA_COLS::2], replicas[_DATA_COLS + 1::2]
    for i, name in enumerate(names):
        out[f"data_{name}_seq_share"] = float(packs[i] / packs.sum().clamp_min(1))
        out[f"data_{name}_token_share"] = float(tokens[i] / tokens.sum().clamp_min(1))
    return out
