"""cuDNN's scaled_dot_product_attention against the backends without it, for a KSA export's key blocks: a prefill's
first call on a new prompt length and a call again, and generation steps after each prompt (new shapes at every
step). cuDNN plans a graph for each new shape; the memory-efficient kernel plans none. One process, 4 KSA layers
with the 30B's attention shapes and the 30B recipe's windows (bench/hf_ksa_batch_gpu.py attn_30b), bf16, after a
1K warm-up; the backends without cuDNN first, so cuDNN starts with no plan. A GPU only.

    python3 bench/probe_sdpa_cudnn.py > $OUT/cudnn.jsonl
(bench/RESULTS.md, "A KSA export's blocks run as one scaled_dot_product_attention call each")"""
import json
import sys
import tempfile
import time

import torch

sys.path.insert(0, ".")
from bench.hf_ksa_batch_gpu import KSA_CODE, attn_30b, ksa_writer, two_exports  # noqa: E402
from bench.hf_ksa_prefill_gpu import GEN_NEW, load, steps  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main():
    from bench.cli import parser
    parser(__doc__).parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_sdpa_cudnn: cuDNN's attention needs a CUDA GPU")
    this = "models/hf/modeling_qwen3_moe_ksa.py"
    new_dir, _ = two_exports(tempfile.mkdtemp(), {**attn_30b(131072 + 256), "num_hidden_layers": 4}, [0, 1, 2, 3],
                             this, ksa_writer([128, 128, 128, 1024]), code=KSA_CODE)
    m = load(new_dir, torch.bfloat16)
    code = sys.modules[type(m.model.layers[0].self_attn).__module__]  # the directory's copy of the file
    every = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    warm = torch.randint(0, 1000, (1, 1024), device="cuda")
    timed(lambda: m(input_ids=warm, use_cache=True, logits_to_keep=1))
    for name, backends in (("no_cudnn", code.SDPA_BACKENDS), ("cudnn", every)):
        code.SDPA_BACKENDS = backends
        for n, seed in ((32768, 1), (32768, 1), (32771, 2), (131072, 3), (131072, 3)):
            ids = torch.randint(0, 151936, (1, n), generator=torch.Generator().manual_seed(seed)).cuda()
            s, out = timed(lambda: m(input_ids=ids, use_cache=True, logits_to_keep=1))
            rec = {"backends": name, "prompt": n, "seed": seed, "prefill_s": round(s, 4)}
            if n < 100000:
                cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
                token = out.logits[:, -1:].argmax(-1)
                g, _ = timed(lambda: steps(m, cache, token))
                rec["gen_ms_per_step"] = round(1000 * g / GEN_NEW, 2)
            del out
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
