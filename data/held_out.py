"""Held-out sets for train.eval. `data.tokens.eval_paths` and `data.video.eval_shards` name one pool of held-out
data ("/data/val"), or several sets by name ("web=/data/val/web,code=/data/val/code"), each scored on its own.

A comma-separated part is named when the text before its first '=' is a name: a letter, then letters, digits,
'_', '.' or '-' (so "/data/date=2024/x" stays a path; write "./date=2024" for a relative one). Parts with the same
name form one set, in the order first named."""
from __future__ import annotations

import re

from data.token_files import split_paths

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def held_out_sets(spec: str, *, field_name: str) -> list[tuple[str, str]]:
    """(name, its paths comma-joined) per held-out set of `spec`; [("", spec)] when no part is named (one pool;
    an empty spec gives [("", "")]). ValueError naming the setting when some parts are named and others are not,
    or a name has no path."""
    sets: dict[str, list[str]] = {}
    unnamed: list[str] = []
    for part in split_paths(spec):
        name, eq, path = part.partition("=")
        if eq and _NAME.fullmatch(name.strip()):
            if not path.strip():
                raise ValueError(f"{field_name}={spec!r}: held-out set {name.strip()!r} names no path (NAME=PATH)")
            sets.setdefault(name.strip(), []).append(path.strip())
        else:
            unnamed.append(part)
    if not sets:
        return [("", ",".join(unnamed))]
    if unnamed:
        raise ValueError(f"{field_name}={spec!r}: {unnamed[0]!r} has no name but other parts have one: name every "
                         f"held-out set (NAME=PATH,...), or none for one pool")
    return [(name, ",".join(paths)) for name, paths in sets.items()]


def held_out_paths(spec: str, *, field_name: str) -> str:
    """Every held-out path of `spec`, comma-joined, without the sets' names."""
    return ",".join(paths for _, paths in held_out_sets(spec, field_name=field_name) if paths)
