"""Tokenize JSONL text into a megatron indexed dataset (PREFIX.bin + PREFIX.idx + PREFIX.json) for data.kind=tokens.

    python launch/tokenize_text.py --input a.jsonl [b.jsonl.gz ...] --out /data/tok/web --tokenizer QWEN3_DIR [--workers N]
    python launch/tokenize_text.py --synthetic 2000 --out /tmp/tok/synthetic     # the synthetic documents, bytes

One document per line (its `--key` string, default "text"), the tokenizer's <eos> after each. Lines without usable
text are left out and listed, with file, line and reason, in PREFIX.skipped.jsonl; the count is printed and kept in
PREFIX.json. The lines are parsed and tokenized by `--workers` processes (default: every core this process may
use), 1,000 at a time, and written in their order: the files are the same for any count. Train on the result with
`data=tokens data.tokens.paths=/data/tok/web` (docs/data.md "Token files").
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.noise import silence_known_warnings  # noqa: E402

silence_known_warnings()   # megatron-core's notes on TransformerEngine / apex: nothing here uses them


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="*", default=[], help="JSONL files (.jsonl or .jsonl.gz), one document per line")
    p.add_argument("--synthetic", type=int, default=0, help="instead of --input: this many synthetic documents")
    p.add_argument("--seed", type=int, default=0, help="the synthetic documents' seed")
    p.add_argument("--out", required=True, help="the output prefix: writes OUT.bin, OUT.idx, OUT.json")
    p.add_argument("--tokenizer", default="bytes",
                   help="'bytes', or a Hugging Face tokenizer directory (the checkpoint the model starts from)")
    p.add_argument("--vocab-size", type=int, default=512, help="the byte tokenizer's vocabulary (ids and specials)")
    p.add_argument("--key", default="text", help="the JSON field that holds a line's text")
    p.add_argument("--no-eos", action="store_true", help="do not append <eos> after each document")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes that parse and tokenize the lines, one thread each (default: the cores this "
                        "process may use; fewer leave a Hugging Face tokenizer slower than one process on its own "
                        "threads); the documents are written in the lines' order whatever the count")
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error(f"--workers must be >= 1, got {a.workers}")
    if bool(a.input) == bool(a.synthetic):
        p.error("give --input FILES or --synthetic N (one of them)")
    missing = [f for f in a.input if not os.path.isfile(f)]
    if missing:
        p.error(f"--input {missing[0]}: no such file")
    if not os.path.basename(a.out) or os.path.isdir(a.out):   # "od/" would write the hidden files od/.bin, od/.idx
        p.error(f"--out {a.out}: names a directory; --out is a prefix that the files' names begin with (OUT.bin, "
                f"OUT.idx, OUT.json): give e.g. --out {os.path.join(a.out, 'web')}")
    from data.token_files import written_over

    if (hit := written_over(a.out, a.input)) is not None:   # --input ow/web.json --out ow/web: the input replaced
        p.error(f"--input {hit[0]}: is {hit[1]}, a file that writing --out {a.out} replaces; give another --out, or "
                f"rename the input")
    if os.path.exists(a.out + ".idx"):
        p.error(f"--out {a.out}: {a.out}.idx exists; give another prefix or remove it")

    from data.token_files import TokenizeWorkerDied, tokenize_jsonl, write_synthetic_token_files
    from data.video.tokenizer import ByteTokenizer, HFTokenizer

    try:
        tok = ByteTokenizer(vocab_size=a.vocab_size) if a.tokenizer == "bytes" else HFTokenizer(a.tokenizer)
    except ValueError as e:
        p.error(str(e).replace("data.video.tokenizer", "--tokenizer"))
    import importlib
    importlib.import_module("megatron.core.datasets.indexed_dataset")   # its import (seconds) is not the tokenizer's
    t0 = time.perf_counter()
    try:   # replace=False: an .idx that another run wrote since the check above is not written over
        if a.synthetic:
            info = write_synthetic_token_files(a.out, a.synthetic, a.seed, tok, append_eos=not a.no_eos,
                                               replace=False)
        else:
            info = tokenize_jsonl(a.input, a.out, tok, key=a.key, append_eos=not a.no_eos, workers=a.workers,
                                  replace=False)
    except (OSError, TokenizeWorkerDied) as e:   # PrefixBusy (another process writes --out) is an OSError
        print(f"tokenize_text: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    if info["documents"] == 0:
        for ext in (".bin", ".idx", ".json"):
            if os.path.exists(a.out + ext):
                os.unlink(a.out + ext)
        where = f" (the lines left out and why: {a.out}.skipped.jsonl)" if info.get("skipped_lines") else ""
        print(f"tokenize_text: no document written to {a.out}: no line of {', '.join(a.input or ['--synthetic'])} "
              f"has text under --key {a.key!r}{where}; the empty {a.out}.bin/.idx removed", file=sys.stderr)
        return 1
    print(f"wrote {a.out}.bin/.idx: {info['documents']} documents, {info['tokens']} tokens ({info['dtype']}), "
          f"{info['tokens'] / max(dt, 1e-9):,.0f} tokens/s")
    if info.get("skipped_lines"):
        print(f"left out {info['skipped_lines']} line(s) without usable text: {a.out}.skipped.jsonl", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
