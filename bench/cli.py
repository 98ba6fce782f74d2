"""The command line of the bench scripts whose arguments are positional (OLD_MODELING_FILE, LABEL, N): `--help`
prints the script's docstring, and a wrong argument is named before any model is built; require_gpus: the
GPU-only scripts' one line on a machine without the GPUs they need."""
from __future__ import annotations

import argparse
import os


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help is `doc` (the script's docstring) as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def existing_file(path: str) -> str:
    """argparse type: a file that exists (the baseline's modeling file)."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path!r}: no such file")
    return path


SMOKE = "--smoke checks the script on the CPU"


def require_gpus(script: str, *, gpus: int = 1, hint: str = "") -> None:
    """Stops a GPU-only script at once, in one line, where fewer than `gpus` CUDA GPUs are visible (`hint`: what
    checks it on this machine instead). Without it a script ended in a CUDA traceback from deep inside, or spent
    minutes recording each case as an error."""
    import torch

    # is_available first: the trainer's CPU mode (parallel/cpu_mode.py) answers device_count() with 1 in a process
    # where a CPU run was built (a test process), where no GPU is there either
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen >= gpus:
        return
    need = "a CUDA GPU" if gpus == 1 else f"{gpus} CUDA GPUs"
    there = "none is visible here" if seen == 0 and gpus == 1 else f"{seen} are visible here"
    raise SystemExit(f"{os.path.basename(script)} needs {need} and {there}" + (f"; {hint}" if hint else ""))
