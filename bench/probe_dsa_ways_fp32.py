"""Why a DSA export's two ways of attending can differ in fp32: the tiny recipe's shapes (4 DSA layers of width 128,
index 4 x 8, top 32; random weights, models/hf/tiny.py), N tokens, each way forced in turn (densely, gathered). Per
layer: the attention outputs' largest difference (over all queries, and over the first 512), the query rows whose
selected keys differ, and the tokens whose router picks other experts; then the logits'. Runs on a CPU.

    python3 bench/probe_dsa_ways_fp32.py [N]        # N = 4096: about 10 s
(bench/RESULTS.md, "A DSA export's chunks attend densely up to 16 x its top-k")"""
import os
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.hf_ksa_batch_gpu import tiny_recipe  # noqa: E402
from models.hf.tiny import add_tiny_dsa_indexers, save_tiny_qwen3_moe  # noqa: E402

LAYERS = 4


def main(n: int) -> None:
    root = tempfile.mkdtemp()
    save_tiny_qwen3_moe(root, dtype=torch.float32, **tiny_recipe(n + 256))
    add_tiny_dsa_indexers(root, list(range(LAYERS)), heads=4, dim=8, topk=32)
    m = AutoModelForCausalLM.from_pretrained(root, trust_remote_code=True, dtype=torch.float32).eval()
    code = sys.modules[type(m.model.layers[0].self_attn).__module__]  # transformers' copy of the file
    ids = torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(1))
    seen, select = {}, code.select_keys

    def recording(way):
        def select_keys(*a, **k):
            sel, valid = select(*a, **k)
            kept = torch.where(valid, sel, -1).sort(-1).values
            seen.setdefault((way, "sel"), []).append(kept.reshape(-1, sel.shape[-1]))
            return sel, valid
        return select_keys

    logits = {}
    for way, densely in (("dense", True), ("gathered", False)):
        hooks = []
        for i, layer in enumerate(m.model.layers):
            layer.self_attn.attend_densely = densely
            hooks.append(layer.self_attn.register_forward_hook(
                lambda mod, a, o, i=i, w=way: seen.__setitem__((w, "attn", i), o[0].detach().clone())))
            hooks.append(layer.mlp.gate.register_forward_hook(
                lambda mod, a, o, i=i, w=way: seen.__setitem__((w, "gate", i), (o[0] if isinstance(o, tuple) else o)
                                                                 .topk(2, -1).indices.sort(-1).values)))
        code.select_keys = recording(way)
        try:
            with torch.no_grad():
                logits[way] = m(input_ids=ids, use_cache=False).logits
        finally:
            code.select_keys = select
            for h in hooks:
                h.remove()
    per = len(seen[("dense", "sel")]) // LAYERS  # select_keys calls per layer (pieces of queries)
    for i in range(LAYERS):
        a = (seen[("dense", "attn", i)] - seen[("gathered", "attn", i)]).abs()
        sel = [torch.cat(seen[(w, "sel")][i * per:(i + 1) * per]) for w in ("dense", "gathered")]
        rows = int((sel[0] != sel[1]).any(-1).sum())
        routed = int((seen[("dense", "gate", i)] != seen[("gathered", "gate", i)]).any(-1).sum())
        print(f"layer {i}: attention outputs differ by {a.max().item():.3g} ({a[:, :512].max().item():.3g} over the "
              f"first 512 queries); selection differs for {rows} of {n} queries; router for {routed} tokens")
    d, g = logits["dense"], logits["gathered"]
    print(f"logits: max difference {(d - g).abs().max().item():.3g} (largest {g.abs().max().item():.3g}), argmax the "
          f"same at {(d.argmax(-1) == g.argmax(-1)).float().mean().item():.4%} of tokens")


if __name__ == "__main__":
    from bench.cli import parser
    ap = parser(__doc__)
    ap.add_argument("n", type=int, nargs="?", default=4096, help="tokens (4096)")
    main(ap.parse_args().n)
