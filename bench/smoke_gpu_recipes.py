"""The tiny recipes through the launcher on a GPU: what a user runs first on a GPU machine.

Each case is `torchrun --nproc_per_node N launch/pretrain.py recipe=... parallel=single ...` in its own run
directory, one after the other, as a user would chain them (a dense run, its resume, the DSA and KSA stages
from its checkpoint). On a GPU this exercises what the CPU suite cannot: NCCL, bf16, the compiled Triton
kernels (DSA, KSA) inside the model on the recipes' own small shapes, the video loader's decode feeding
CUDA tensors, checkpoints of CUDA tensors and their resume, and the launcher's memory check.

    python bench/smoke_gpu_recipes.py --out $OUT/smoke.json            # one GPU
    python bench/smoke_gpu_recipes.py --only keye_tiny,keye_tiny_resume --out /tmp/smoke.json
    python bench/smoke_gpu_recipes.py --set 30b --out $OUT/smoke30b.json   # the 30B recipes, 2 LM layers
    python bench/smoke_gpu_recipes.py --set formats --out $OUT/smoke_formats.json
    python bench/smoke_gpu_recipes.py --set lm --out $OUT/smoke_lm.json        # the LM-only tiny DSA / KSA stages
    python bench/smoke_gpu_recipes.py --set stages_tiny --out $OUT/st_tiny.json   # alignment, KSA from scratch
    python bench/smoke_gpu_recipes.py --set stages_30b --out $OUT/st_30b.json     # 30B stages from a checkpoint
    python bench/smoke_gpu_recipes.py --set resume_30b --out $OUT/rs_30b.json     # a 30B-width stop and resume
    python bench/smoke_gpu_recipes.py --set eval --out $OUT/eval.json             # train.eval, an HF tokenizer
    python bench/smoke_gpu_recipes.py --set scenes --out $OUT/scenes.json         # slow and fast frames
    python bench/smoke_gpu_recipes.py --set text --out $OUT/text.json             # the LM alone on text shards

Per case: the exit status, wall seconds, the first and last logged step with its loss and router statistics,
tokens/s, the resume or init lines (with the settings a resume changed), and the output's tail when a case fails. The JSON is rewritten after every case.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cli import require_gpus  # noqa: E402
from launch.supervise import run_torchrun  # noqa: E402


SETS = {
    "tiny": "the CPU recipes chained",
    "30b": "the 30B recipes cut to 2 LM layers on synthetic shards",
    "formats": "DSA / KSA with fully_reshardable optimizer state and async saves, stopped and resumed",
    "lm": "the language-model-only tiny DSA / KSA stages",
    "stages_tiny": "the tiny stages the other sets leave out (alignment, KSA from scratch)",
    "stages_30b": "the 30B stages that start from a checkpoint",
    "resume_30b": "3 steps of the 30B slice straight, and stopped after step 2 and resumed",
    "eval": "train.eval and a Hugging Face tokenizer on the tiny recipes",
    "eval_30b": "train.eval in the 30B KSA stages 1 (the teacher runs too) and 2, from a 2-layer dense checkpoint",
    "mixed": "videos with image and text-only samples: the tiny recipes (stopped, resumed) and the 30B slice",
    "scenes": "videos of still scenes in slow and fast frames: the tiny recipe (stopped, resumed) and the 30B slice",
    "text": "the language model alone on text-only shards: the tiny LM (stopped, resumed) and the 30B LM cut to 2 layers",
    "tokens": "token files: the tiny LM (stopped, resumed) and the 30B LM cut to 2 layers on them alone; the tiny "
              "recipe (stopped, resumed) and the 30B slice with their rows among the video packs",
}
SETS_ON_30B_VIDEOS = ("30b", "stages_30b", "resume_30b", "eval_30b", "mixed", "scenes", "text", "tokens")  # the sets whose cases read root/videos


def cases(root: Path, which: str, shards: str) -> list[tuple[str, str, str, list[str]]]:
    """(case name, recipe, run directory name under root, overrides); later cases start from earlier cases' run
    directories (`init`), and a case that reuses one resumes it."""
    init = lambda name: f"train.checkpoint.init_from={root / name}"  # noqa: E731
    single = ["parallel=single", "train.wandb.enabled=false"]

    def stopped_and_resumed(name: str, recipe: str, run: str, overrides: list[str], at: int = 10) -> list[tuple]:
        """The run stopped after step `at`, then the same command resuming it in the same run directory."""
        return [(name, recipe, run, overrides + [f"train.stop_after={at}"]), (f"{name}_resume", recipe, run, overrides)]

    if which == "lm":
        # the language-model-only tiny stages, from keye_tiny_lm as the recipes' comments chain them
        return [
            ("keye_tiny_lm", "keye_tiny_lm", "lm", single),
            ("keye_tiny_dsa_warmup", "keye_tiny_dsa_warmup", "lm_dsa_warmup", single + [init("lm")]),
            ("keye_tiny_dsa_sparse", "keye_tiny_dsa_sparse", "lm_dsa_sparse", single + [init("lm_dsa_warmup")]),
            ("keye_tiny_ksa_distill", "keye_tiny_ksa_distill", "lm_ksa_distill", single + [init("lm")]),
            ("keye_tiny_ksa", "keye_tiny_ksa", "lm_ksa", single),
        ]
    if which == "formats":
        # the other checkpoint settings on the attention variants: per-parameter optimizer state written from a
        # forked writer, stopped at step 10 and resumed
        fmt = single + ["train.checkpoint.optimizer_format=fully_reshardable", "train.checkpoint.async_save=true"]
        return (stopped_and_resumed("dsa_sparse_fully_reshardable_async", "keye_tiny_vl_dsa_sparse", "fmt_dsa", fmt)
                + stopped_and_resumed("ksa_fully_reshardable_async", "keye_tiny_vl_ksa", "fmt_ksa", fmt))
    # the 30B recipes at full width, cut to 2 LM layers (the ViT whole), on synthetic video shards; `cut` runs 3
    # steps without checkpoints
    def slice_on(data: str) -> list[str]:
        return single + ["parallel.vit.recompute=true", "model.lm.num_layers=2", f"data.video.shards={data}",
                         "train.global_batch_size=2", "train.warmup_steps=1", "train.log_interval=1"]

    slice_30b = slice_on(f"{shards}/shards")
    no_ckpt = "train.checkpoint.enabled=false"
    cut = slice_30b + ["train.steps=3", no_ckpt]
    # a run of keye_30b_a3b (2 steps) writes the 2-layer slice's checkpoint (~32 GB with its optimizer state); the
    # stages of stages_30b and eval_30b start from it (model weights only) and train 2 steps without one of their own
    checkpoint_30b = ("keye_30b_a3b_checkpoint", "keye_30b_a3b", "st_30b", slice_30b + ["train.steps=2"])
    two = slice_30b + ["train.steps=2", no_ckpt, init("st_30b")]
    at_32k = [f"data.video.long_shards={shards}/long_shards", "data.video.seq_len=32768", "train.seq_length=32768",
              "data.video.max_video_tokens=24576", "parallel.vit.group=1"]
    if which == "stages_tiny":
        # the tiny stages the other sets leave out: projector alignment (ViT and LM frozen, so it starts from a
        # checkpoint that holds them) and the LM-only KSA model from scratch
        return [
            ("keye_tiny", "keye_tiny", "st_keye_tiny", single + ["train.stop_after=20"]),
            ("keye_tiny_align", "keye_tiny_align", "st_align", single + [init("st_keye_tiny")]),
            ("keye_tiny_ksa", "keye_tiny_ksa", "st_lm_ksa", single),
        ]
    if which == "stages_30b":
        # the 30B stages that start from a checkpoint (frozen ViT, or the dense model to convert)
        return [
            checkpoint_30b,
            ("keye_30b_a3b_align", "keye_30b_a3b_align", "st_30b_align", two),
            ("keye_30b_a3b_dsa_warmup_32k", "keye_30b_a3b_dsa_warmup", "st_30b_dsa_warmup", two + at_32k),
            ("keye_30b_a3b_ksa_stage1", "keye_30b_a3b_ksa_stage1", "st_30b_ksa1", two),
            ("keye_30b_a3b_ksa_stage3", "keye_30b_a3b_ksa_stage3", "st_30b_ksa3", two + at_32k),
        ]
    if which == "eval":
        # the held-out loss (train.eval) in bf16 with the compiled kernels, and video documents tokenized with a
        # Hugging Face tokenizer (the small one data/video/synthetic.py trains, written under root/tokenizer)
        ev = single + ["train.steps=20", "train.eval.interval=10"]
        return [
            ("keye_tiny_eval_hf_tokenizer", "keye_tiny", "ev_tiny", ev + [f"data.video.tokenizer={root / 'tokenizer'}"]),
            ("keye_tiny_vl_dsa_sparse_eval", "keye_tiny_vl_dsa_sparse", "ev_dsa", ev),
            ("keye_tiny_vl_ksa_eval", "keye_tiny_vl_ksa", "ev_ksa", ev),
            # the distillation stage evaluates its own terms: the dense teacher runs in evaluation too
            ("keye_tiny_vl_ksa_distill_eval", "keye_tiny_vl_ksa_distill", "ev_ksa_distill", ev),
        ]
    if which == "eval_30b":
        # what evaluation costs in KSA distillation at full width, where the dense teacher runs beside the student,
        # against stage 2's evaluation (no teacher) from the same checkpoint, on held-out videos of another seed
        ev = two + ["train.eval.interval=1", f"data.video.eval_shards={shards}/eval/shards"]
        return [
            checkpoint_30b,
            ("keye_30b_a3b_ksa_stage1_eval", "keye_30b_a3b_ksa_stage1", "ev_30b_ksa1", ev),
            ("keye_30b_a3b_ksa_stage2_eval", "keye_30b_a3b_ksa_stage2", "ev_30b_ksa2", ev),
        ]
    if which == "mixed":
        # image and text-only samples among the videos (docs/data.md): the tiny recipe makes its own (12 images, 3
        # interleaved records of 2-3 images and 12 texts beside 24 videos), stopped at step 10 and resumed, and KSA
        # on them; the 30B slice (the so400m ViT at full width) on 32 videos + 16 images + 4 image sets + 16 texts,
        # the images at their native sizes (up to 1280 tokens)
        mix = single + ["data.synthetic_images=12", "data.synthetic_texts=12"]
        return stopped_and_resumed("keye_tiny_mixed", "keye_tiny", "mx_tiny", mix) + [
            ("keye_tiny_vl_ksa_mixed", "keye_tiny_vl_ksa", "mx_ksa", mix),
            ("keye_30b_a3b_mixed", "keye_30b_a3b", "mx_30b", slice_on(f"{shards}/mixed/shards") + ["train.steps=3", no_ckpt]),
        ]
    if which == "scenes":
        # slow and fast frames (docs/data.md): the tiny recipe on its own videos of 3 still scenes at ratio 0.3,
        # stopped at step 10 and resumed; the 30B slice (whose data config has ratio 0.3) on 32 videos of 4 scenes,
        # and the same slice at ratio 0 on the same shards, every frame slow
        sf = single + ["data.synthetic_scenes=3", "data.video.fast_frame_ratio=0.3"]
        on = slice_on(f"{shards}/scenes/shards") + ["train.steps=3", no_ckpt]
        return stopped_and_resumed("keye_tiny_slow_fast", "keye_tiny", "sf_tiny", sf) + [
            ("keye_30b_a3b_slow_fast", "keye_30b_a3b", "sf_30b", on),
            ("keye_30b_a3b_all_slow", "keye_30b_a3b", "sf_30b_slow", on + ["data.video.fast_frame_ratio=0"]),
        ]
    if which == "text":
        # the language model alone on the packed loader's text-only samples (docs/data.md "A language model on
        # text"): the tiny LM on its own 400 synthetic texts, stopped at step 10 and resumed; the 30B LM (2 layers,
        # 128 experts each) on 2,000 synthetic text records ingested as shards (repeats dropped), at the recipe's 8K sequences
        tx = single + ["data=text_tiny", "train.micro_batch_size=1"]
        lm_30b = single + ["model.lm.num_layers=2", "data=text", f"data.video.shards={shards}/texts/shards",
                           "train.micro_batch_size=1", "train.global_batch_size=2", "train.warmup_steps=1",
                           "train.log_interval=1", "train.steps=3", no_ckpt]
        return stopped_and_resumed("keye_tiny_lm_text", "keye_tiny_lm", "tx_tiny", tx) + [
            ("keye_30b_a3b_lm_text", "keye_30b_a3b_lm", "tx_30b", lm_30b)]
    if which == "tokens":
        # the language model alone on token files (docs/data.md "Token files"), which each run makes from 2,000
        # synthetic documents (byte tokenizer): the tiny LM stopped at step 10 and resumed; the 30B LM (2 layers,
        # 128 experts each) at the recipe's 8K rows
        tk = single + ["data=tokens_tiny", "train.micro_batch_size=1"]
        lm_30b = tk + ["model.lm.num_layers=2", "train.global_batch_size=2", "train.warmup_steps=1",
                       "train.log_interval=1", "train.steps=3", no_ckpt]
        # then token-file rows as 0.3 of the packs beside videos (data.video.text_tokens; docs/data.md "Mixture"):
        # the tiny recipe on its own videos, stopped at step 10 and resumed, and the 30B slice on 32 videos; the
        # files carry each recipe's tokenizer (bytes with 512 / 151,936 ids)
        rows = lambda vocab: [f"data.video.text_tokens={shards}/tokens{vocab}/web",  # noqa: E731
                              "data.video.text_tokens_fraction=0.3"]
        return stopped_and_resumed("keye_tiny_lm_tokens", "keye_tiny_lm", "tk_tiny", tk) + [
            ("keye_30b_a3b_lm_tokens", "keye_30b_a3b_lm", "tk_30b", lm_30b)] + stopped_and_resumed(
            "keye_tiny_token_rows", "keye_tiny", "tk_vl_tiny", single + rows(512)) + [
            ("keye_30b_a3b_token_rows", "keye_30b_a3b", "tk_vl_30b", cut + rows(151936))]
    if which == "resume_30b":
        # a resume at full width: 3 steps straight, then the same 3 steps stopped after step 2 (checkpoint of the
        # model, the distributed optimizer's state and the loaders', ~32 GB) and rerun, which must resume at step 2;
        # the rerun writes no checkpoint of its own (resuming does not need train.checkpoint.enabled, and two
        # checkpoints of the slice would not fit the lent machine's 64 GB disk)
        stop = slice_30b + ["train.steps=3", "train.stop_after=2"]
        return [("keye_30b_a3b_3_steps", "keye_30b_a3b", "rs_30b_straight", cut),
                ("keye_30b_a3b_stop_after_2", "keye_30b_a3b", "rs_30b", stop),
                ("keye_30b_a3b_resume", "keye_30b_a3b", "rs_30b", cut)]
    if which == "30b":
        # no checkpoints here (the tiny set covers them; stages_30b writes one)
        return [
            ("keye_30b_a3b", "keye_30b_a3b", "30b", cut),
            ("keye_30b_a3b_dsa_sparse_32k", "keye_30b_a3b_dsa_sparse", "30b_dsa",
             cut + at_32k),
            ("keye_30b_a3b_ksa_stage2", "keye_30b_a3b_ksa_stage2", "30b_ksa", cut),
        ]
    return [
        ("keye_tiny", "keye_tiny", "keye_tiny", single + ["train.stop_after=20"]),
        ("keye_tiny_vl_dsa_warmup", "keye_tiny_vl_dsa_warmup", "dsa_warmup", single + [init("keye_tiny")]),
        ("keye_tiny_vl_dsa_sparse", "keye_tiny_vl_dsa_sparse", "dsa_sparse",
         single + [init("dsa_warmup"), "train.stop_after=10"]),
        ("keye_tiny_vl_dsa_sparse_resume", "keye_tiny_vl_dsa_sparse", "dsa_sparse", single + [init("dsa_warmup")]),
        ("keye_tiny_vl_ksa", "keye_tiny_vl_ksa", "ksa", single),
        ("keye_tiny_vl_ksa_distill", "keye_tiny_vl_ksa_distill", "ksa_distill", single + [init("keye_tiny")]),
        ("keye_tiny_resume", "keye_tiny", "keye_tiny", single),
        ("keye_tiny_lm", "keye_tiny_lm", "keye_tiny_lm", single),
    ]


def summarise(run_dir: Path) -> dict:
    out: dict = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if rows:
            router = ("moe_load_max", "moe_load_max_layer", "moe_idle_experts", "moe_lb_loss")
            out["first"] = {k: rows[0].get(k) for k in ("step", "loss") + router}
            out["last"] = {k: rows[-1].get(k) for k in ("step", "loss", "tokens_per_s", "step_time_s",
                                                        "data_wait_s", "data_wait_rank", "data_samples_failed") + router}
            out["rows"] = len(rows)
            out["losses"] = {r["step"]: r.get("loss") for r in rows}
            if any("vit_grad" in r for r in rows):  # 0 in a step whose packs hold no frame (text-only samples)
                out["vit_grad"] = {r["step"]: r.get("vit_grad") for r in rows}
    evals = run_dir / "eval.jsonl"
    if evals.exists():
        out["evals"] = [json.loads(line) for line in evals.read_text().splitlines() if line.strip()]
    log = run_dir / "logs" / "rank0.log"
    if log.exists():
        text = log.read_text(errors="replace").splitlines()
        out["started_from"] = [line for line in text if "resumed from" in line or "initialised" in line
                               or "settings changed since" in line][-4:]
        out["log_tail"] = text[-12:]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", default="/tmp/keye_smoke", help="where the cases' run directories go")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per case")
    ap.add_argument("--set", default="tiny", choices=tuple(SETS),
                    help="; ".join(f"{name}: {what}" for name, what in SETS.items()))
    args = ap.parse_args()
    # on the CPU the tiny recipes ran for minutes each, recorded as a GPU's results
    require_gpus(__file__, gpus=args.nproc, hint="on the CPU the tests run the recipes (tests/integration)")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    only = {c for c in args.only.split(",") if c}
    import torch

    result: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__, "cases": []}
    shards = ""
    if args.set == "eval":
        from data.video.synthetic import make_synthetic_hf_tokenizer
        make_synthetic_hf_tokenizer(root / "tokenizer")
    if args.set in SETS_ON_30B_VIDEOS:  # synthetic videos ingested twice: the DSA stage wants a long source apart from the short
        shards = str(root / "videos")
        subprocess.run([sys.executable, "launch/make_synthetic_videos.py", "--out", shards, "--n", "32", "--shards",
                        "--workers", "8"], cwd=REPO, check=True, capture_output=True)
        if not Path(shards, "long_shards").exists():
            shutil.copytree(Path(shards, "shards"), Path(shards, "long_shards"))
        if args.set == "mixed":  # videos, images and text-only samples in shards of their own
            subprocess.run([sys.executable, "launch/make_synthetic_videos.py", "--out", str(Path(shards, "mixed")),
                            "--n", "32", "--images", "16", "--image-sets", "4", "--text", "16", "--shards", "--workers", "8"],
                           cwd=REPO,
                           check=True, capture_output=True)
        if args.set == "scenes":  # videos of still scenes, for slow and fast frames
            subprocess.run([sys.executable, "launch/make_synthetic_videos.py", "--out", str(Path(shards, "scenes")),
                            "--n", "32", "--scenes", "4", "--shards", "--workers", "8"], cwd=REPO, check=True,
                           capture_output=True)
        if args.set == "text":  # text-only samples, no video
            subprocess.run([sys.executable, "launch/make_synthetic_videos.py", "--out", str(Path(shards, "texts")),
                            "--n", "0", "--text", "2000", "--shards"], cwd=REPO, check=True, capture_output=True)
        if args.set == "tokens":  # token files of 2,000 synthetic documents for each recipe's tokenizer
            for vocab in (512, 151936):
                if not Path(shards, f"tokens{vocab}", "web.idx").exists():
                    subprocess.run([sys.executable, "launch/tokenize_text.py", "--synthetic", "2000", "--vocab-size",
                                    str(vocab), "--out", str(Path(shards, f"tokens{vocab}", "web"))], cwd=REPO,
                                   check=True, capture_output=True)
        if args.set == "eval_30b":  # held-out videos: another seed, shards of their own
            subprocess.run([sys.executable, "launch/make_synthetic_videos.py", "--out", str(Path(shards, "eval")), "--n",
                            "8", "--seed", "1", "--shards", "--workers", "8"], cwd=REPO, check=True, capture_output=True)
    for name, recipe, run_name, overrides in cases(root, args.set, shards):
        if only and name not in only:
            continue
        run_dir = root / run_name
        cmd = ["torchrun", "--standalone", f"--nproc_per_node={args.nproc}", "launch/pretrain.py",
               f"recipe={recipe}", *overrides, f"run_dir={run_dir}"]
        t0 = time.perf_counter()
        try:
            proc = run_torchrun(cmd, cwd=REPO, timeout=args.timeout)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:  # its workers stopped too (launch/supervise.py)
            rc, out = "timeout", (e.output or "") + (e.stderr or "")
        case = {"name": name, "cmd": " ".join(cmd[1:]), "rc": rc, "wall_s": round(time.perf_counter() - t0, 1)}
        case.update(summarise(run_dir))
        if rc != 0:
            case["output_tail"] = out[-4000:]
        result["cases"].append(case)
        print(json.dumps({k: case.get(k) for k in ("name", "rc", "wall_s", "first", "last")}), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    bad = [c["name"] for c in result["cases"] if c["rc"] != 0]
    print("failed:", bad if bad else "none")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
