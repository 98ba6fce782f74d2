"""The command line of the bench scripts whose arguments are positional (OLD_MODELING_FILE, LABEL, N): `--help`
prints the script's docstring, and a wrong argument is named before any model is built."""
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
