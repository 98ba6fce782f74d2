"""A KSA export's prefill and generation through its transformers code (models/hf/modeling_qwen3_moe_ksa.py): this
version against an earlier one (the baseline, OLD_MODELING_FILE), loaded from the same checkpoint in one process,
each directory with its own code. Recorded comparisons (bench/RESULTS.md): key blocks (each block of queries over
the keys it may see: far summaries, window, its own columns) against every query block over every key, masked; and
each block as one scaled_dot_product_attention call against its fp32 logits, mask and softmax in PyTorch.

Models (random weights, models/hf/tiny.py; chunks of 8, 1 summary, as the recipes): 4 layers with the 30B's
attention shapes (hidden 2048, 32 query / 4 KV heads of 128, Qwen3's vocabulary), all KSA with the 30B recipe's
windows (128, 128, 128, 1024 chunks, recipes/model/keye_30b_a3b_ksa.yaml); and the tiny recipe's 4 KSA layers of
width 128 (windows 4, 4, 4, 64). One row, bf16:
  * prefill with the cache and logits_to_keep=1 (as generate()'s): time (a warm-up, then REPEAT calls: least and
    most) and peak memory above the weights, per prompt length; the baseline up to BASELINE_UPTO tokens (every key took
    tens of seconds beyond 64K), this version at every length; on a GPU, the 8 kernels that take most of this
    version's prefill at GEN_PROMPT tokens (a profile of one call);
  * generation after a GEN_PROMPT prompt in the cache (the prefill not timed): GEN_NEW greedy steps, a forward of
    one token each with the cache, as generate()'s loop; time per step (least and most of REPEAT runs, each after
    its own prefill) and whether both give the same tokens;
  * the last token's logits of both (max difference, same argmax), and in fp32 at FP32_PROMPT tokens every token's.
On a CPU, a dry run at small sizes.

    python3 bench/hf_ksa_prefill_gpu.py OLD_MODELING_FILE [BASELINE_UPTO] > $OUT/ksa_prefill.jsonl
    (OLD_MODELING_FILE: the baseline's models/hf/modeling_qwen3_moe_ksa.py, e.g. from `git show a76182f:...`;
    BASELINE_UPTO: the longest prompt the baseline runs, 65536 unless given)"""
import functools
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, ".")
from bench.hf_ksa_batch_gpu import KSA_CODE, attn_30b, ksa_writer, tiny_recipe, two_exports  # noqa: E402
from bench.hf_logits_gpu import measured, repeated, top_kernels  # noqa: E402  (seconds, peak memory, kernels)
from models.hf.modeling_qwen3_moe_ksa import CACHE_KEY  # noqa: E402  (the cache's keyword in this transformers)

CUDA = torch.cuda.is_available()
DEV, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
if CUDA:
    LENGTHS, REPEAT = (8192, 32768, 65536, 131072), 2
    GEN_PROMPT, GEN_NEW, FP32_PROMPT = 32768, 64, 4096
else:
    LENGTHS, REPEAT = (256, 1024), 1
    GEN_PROMPT, GEN_NEW, FP32_PROMPT = 256, 4, 300
WINDOWS_30B = [128, 128, 128, 1024] if CUDA else [4, 4, 4, 16]
MODELS = {"attn30b_4layers": (attn_30b(max(LENGTHS) + 256), [0, 1, 2, 3], {"windows": WINDOWS_30B}),
          "tiny_recipe": (tiny_recipe(max(LENGTHS) + 256), [0, 1, 2, 3], {"windows": [4, 4, 4, 64]})}
NEW, OLD = "this", "baseline"


def load(d: str, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=dtype, trust_remote_code=True).to(DEV).eval()


def steps(model, cache, token: torch.Tensor) -> torch.Tensor:
    """GEN_NEW greedy steps from `token` [1, 1] with the cache; the tokens."""
    out = [token]
    for _ in range(GEN_NEW):
        logits = model(input_ids=out[-1], use_cache=True, logits_to_keep=1, **{CACHE_KEY: cache}).logits
        out.append(logits[:, -1:].argmax(-1))
    return torch.cat(out, dim=1)


def ksa_exports(root: str, shape: dict, layers: list[int], info: dict, old_file: str) -> tuple[str, str]:
    return two_exports(root, shape, layers, old_file, ksa_writer(info["windows"]), code=KSA_CODE)


def compare(models: dict, exports, argv: list[str]):
    """This version against old_file's on each of `models` ({name: (shape, layers, info)}, info recorded in every
    line), both from exports(root, shape, layers, info, old_file) -> (this version's directory, the baseline's).
    argv: [OLD_MODELING_FILE, BASELINE_UPTO (optional; on a CPU the dry run's longest length)]."""
    old_file = argv[0]
    upto = int(argv[1]) if CUDA and argv[1:] else (65536 if CUDA else max(LENGTHS))
    root = tempfile.mkdtemp()
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    for shape_name, (shape, layers, info) in models.items():
        dirs = dict(zip((NEW, OLD), exports(os.path.join(root, shape_name),
                                            {**shape, "num_hidden_layers": len(layers)}, layers, info, old_file)))
        versions = {name: load(d, DTYPE) for name, d in dirs.items()}
        vocab = shape["vocab_size"]
        for n in LENGTHS:
            ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(DEV)
            rec = {"model": shape_name, **info, "prompt": n, "dtype": str(DTYPE), "device": device}
            last = {}
            for name, m in versions.items():
                if name == OLD and n > upto:
                    continue
                call = lambda: m(input_ids=ids, use_cache=True, logits_to_keep=1).logits[0, -1].float()  # noqa: E731
                rec[name], last[name] = repeated(call, REPEAT)
            if OLD in last:
                rec["speedup"] = round(rec[OLD]["s_min"] / rec[NEW]["s_min"], 2)
                if CUDA:
                    rec["peak_ratio"] = round(rec[NEW]["peak_gib"] / rec[OLD]["peak_gib"], 3)
                rec["last_logits_max_abs_diff"] = (last[NEW] - last[OLD]).abs().max().item()
                rec["last_logits_max_abs"] = last[OLD].abs().max().item()
                rec["same_argmax"] = bool(last[NEW].argmax() == last[OLD].argmax())
            print(json.dumps(rec), flush=True)
        if CUDA:
            ids = torch.randint(0, vocab, (1, GEN_PROMPT), generator=torch.Generator().manual_seed(3)).to(DEV)
            print(json.dumps({"model": shape_name, "profile_prompt": GEN_PROMPT, "version": NEW,
                              **top_kernels(versions[NEW], ids)}), flush=True)
        # generation: GEN_NEW greedy steps after a prompt in the cache, the steps alone timed
        ids = torch.randint(0, vocab, (1, GEN_PROMPT), generator=torch.Generator().manual_seed(7)).to(DEV)
        rec = {"model": shape_name, **info, "gen_prompt": GEN_PROMPT, "gen_new": GEN_NEW,
               "dtype": str(DTYPE), "device": device}
        tokens = {}
        for name, m in versions.items():
            runs = []
            for _ in range(REPEAT):
                with torch.no_grad():
                    out = m(input_ids=ids, use_cache=True, logits_to_keep=1)
                cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
                first = out.logits[:, -1:].argmax(-1)
                seconds, peak, tokens[name] = measured(functools.partial(steps, m, cache, first))
                runs.append((seconds, peak))
                del out, cache
            rec[name] = {"ms_per_step_min": round(1000 * min(r[0] for r in runs) / GEN_NEW, 2),
                         "ms_per_step_max": round(1000 * max(r[0] for r in runs) / GEN_NEW, 2),
                         "peak_gib": None if runs[0][1] is None else round(max(r[1] for r in runs) / 2.0 ** 30, 3)}
        rec["per_step_speedup"] = round(rec[OLD]["ms_per_step_min"] / rec[NEW]["ms_per_step_min"], 2)
        rec["same_tokens"] = bool(torch.equal(tokens[NEW], tokens[OLD]))
        print(json.dumps(rec), flush=True)
        del versions
        fp32 = {name: load(d, torch.float32) for name, d in dirs.items()}
        ids = torch.randint(0, vocab, (1, FP32_PROMPT), generator=torch.Generator().manual_seed(1)).to(DEV)
        with torch.no_grad():
            logits = {name: m(input_ids=ids, use_cache=False).logits for name, m in fp32.items()}
        print(json.dumps({"model": shape_name, **info, "fp32_prompt": FP32_PROMPT,
                          "logits_max_abs_diff": (logits[NEW] - logits[OLD]).abs().max().item(),
                          "logits_max_abs": logits[OLD].abs().max().item(),
                          "argmax_agree": (logits[NEW].argmax(-1) == logits[OLD].argmax(-1)).float().mean().item()}),
              flush=True)
        del fp32, logits


def command_line(doc: str) -> list[str]:
    """[OLD_MODELING_FILE, BASELINE_UPTO if given], as compare() takes them; --help prints `doc`."""
    from bench.cli import existing_file, parser
    ap = parser(doc)
    ap.add_argument("old_modeling_file", type=existing_file, help="the baseline's modeling file")
    ap.add_argument("baseline_upto", type=int, nargs="?", help="the longest prompt the baseline runs (65536)")
    a = ap.parse_args()
    return [a.old_modeling_file] + ([str(a.baseline_upto)] if a.baseline_upto is not None else [])


if __name__ == "__main__":
    compare(MODELS, ksa_exports, command_line(__doc__))
