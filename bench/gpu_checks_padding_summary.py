"""The tables of bench/gpu_checks_padding.sh from its runs' metrics.jsonl copies in OUT.

    python3 bench/gpu_checks_padding_summary.py tiny OUT     # part 2: the loss at steps 1-40, first differing step
    python3 bench/gpu_checks_padding_summary.py slice OUT    # part 3: step time and peak memory, padded or not
"""
import json
import statistics
import sys
from pathlib import Path

COMPARED = ("loss", "grad_norm", "vit_grad", "lr")


def _rows(f: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []
    return {r["step"]: r for r in rows if "loss" in r}


def first_difference(a: dict, b: dict) -> int | None:
    """The first step at which a logged value (loss, norms, lr, the routers' metrics) differs, bit for bit."""
    for s in sorted(set(a) & set(b)):
        keys = [k for k in a[s] if k in b[s] and (k in COMPARED or k.startswith("moe_"))]
        if any(a[s][k] != b[s][k] for k in keys):
            return s
    return None


def tiny(out: Path) -> None:
    runs = {f.stem[len("tiny_"):]: _rows(f) for f in sorted(out.glob("tiny_*.jsonl"))}
    steps = (1, 10, 20, 30, 40)
    print("run", *[f"step {s}" for s in steps], sep=" | ")
    for name, rows in runs.items():
        print(name, *[repr(rows[s]["loss"]) if s in rows else "-" for s in steps], sep=" | ")
    for x, y in (("base_det", "this_det"), ("this_off1", "this_off2")):
        if x in runs and y in runs:
            print(f"{x} against {y}: first step that differs: {first_difference(runs[x], runs[y])}")


def slice_(out: Path) -> None:
    for pad in ("true", "false"):
        rows = list(_rows(out / f"slice_{pad}.jsonl").values())
        late = [r for r in rows if r["step"] >= 3 and "step_time_s" in r]
        if not late:
            print(f"pad_to_seq_len={pad}: no steps logged past step 2")
            continue
        print(f"pad_to_seq_len={pad}: {len(rows)} steps, median step time of steps 3-{late[-1]['step']} "
              f"{statistics.median(r['step_time_s'] for r in late):.4f} s, median data wait "
              f"{statistics.median(r.get('data_wait_s', 0.0) for r in late):.4f} s, peak memory "
              f"{max(r.get('peak_mem_gb', 0.0) for r in rows):.2f} GB, losses {[round(r['loss'], 4) for r in rows]}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("tiny", "slice"):
        raise SystemExit(__doc__)
    {"tiny": tiny, "slice": slice_}[sys.argv[1]](Path(sys.argv[2]))
