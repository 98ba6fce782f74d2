"""Held-out sets for train.eval. `data.tokens.eval_paths` and `data.video.eval_shards` name one pool of held-out
data ("/data/val"), or several sets by name ("web=/data/val/web,code=/data/val/code"), each scored on its own;
`train.eval.set_batches` ("code=4") may give a named set its own number of global batches, or "all": the whole set,
once (`WHOLE`).

A comma-separated part is named when the text before its first '=' is a name: a letter, then letters, digits,
'_', '.' or '-' (so "/data/date=2024/x" stays a path; write "./date=2024" for a relative one). Parts with the same
name form one set, in the order first named."""
from __future__ import annotations

import re

from data.token_files import split_paths
from data.video.remote import split_spec

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
# a held-out set's count of global batches meaning "the whole set, once": every sequence of its first epoch, the
# last global batch filled with sequences that count for nothing (train.eval.batches=0, or set_batches NAME=all)
WHOLE = 0


def held_out_sets(spec: str, *, field_name: str) -> list[tuple[str, str]]:
    """(name, its paths comma-joined) per held-out set of `spec`; [("", spec)] when no part is named (one pool;
    an empty spec gives [("", "")]). ValueError naming the setting when some parts are named and others are not,
    or a name has no path."""
    sets: dict[str, list[str]] = {}
    unnamed: list[str] = []
    # shards on object storage may be named by brace lists, whose commas split nothing ("{a,b}")
    for part in split_spec(spec) if "://" in str(spec or "") else split_paths(spec):
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


def held_out_spec(data) -> tuple[str, str]:
    """(the held-out spec, its setting's name) of a data config (train/config.DataConfig): data.video.eval_shards
    for video data, data.tokens.eval_paths for token files; ("", "") for synthetic text (no paths)."""
    if data.kind == "video":
        return data.video.eval_shards, "data.video.eval_shards"
    if data.kind == "tokens":
        return data.tokens.eval_paths, "data.tokens.eval_paths"
    return "", ""


def parse_set_batches(spec: str) -> dict[str, int]:
    """train.eval.set_batches ("code=4,web=all") -> {set name: global batches, WHOLE for "all"}. ValueError naming
    the setting and the part that is not NAME=N with N >= 1 or NAME=all, or a set named twice."""
    out: dict[str, int] = {}
    if not spec.strip():
        return out
    for part in (p.strip() for p in spec.split(",")):
        name, eq, count = (x.strip() for x in part.partition("="))
        if not (eq and _NAME.fullmatch(name) and (count == "all" or count.isdigit() and int(count) >= 1)):
            raise ValueError(f"train.eval.set_batches={spec!r}: {part!r} is not NAME=N or NAME=all (a held-out set's "
                             f"name and its number of global batches, >= 1, or all: the whole set once)")
        if name in out:
            raise ValueError(f"train.eval.set_batches={spec!r}: set {name!r} is given twice")
        out[name] = WHOLE if count == "all" else int(count)
    return out


def eval_plan(data, batches: int, set_batches: str) -> list[tuple[str, str, int]]:
    """(name, paths, global batches) per held-out set of a run: the count train.eval.set_batches gives a set by
    name, `batches` for the others; WHOLE (0) for a set scored whole, once. ValueError naming
    train.eval.set_batches when it names a set the held-out spec does not, and naming the setting that asks for a
    whole set when the held-out data is synthetic text (a generator without an end)."""
    spec, field_name = held_out_spec(data)
    sets = held_out_sets(spec, field_name=field_name) if field_name else [("", "")]
    names = [name for name, _ in sets if name]
    counts = parse_set_batches(set_batches)
    unknown = [name for name in counts if name not in names]
    if unknown:
        where = (f"{field_name}={spec!r} names the sets {', '.join(names)}" if names else
                 f"{field_name}={spec!r} names no set (one pool)" if field_name else
                 "synthetic text has one held-out set, without a name")
        raise ValueError(f"train.eval.set_batches names {', '.join(map(repr, unknown))}, not a held-out set of this "
                         f"run: {where}")
    plan = [(name, paths, counts.get(name, batches)) for name, paths in sets]
    if not field_name and any(n == WHOLE for *_, n in plan):
        raise ValueError("train.eval.batches=0 asks for the whole held-out set, once, but synthetic text (data.kind="
                         f"{data.kind}) is a generator without an end: give a number of global batches (>= 1), or "
                         "held-out files (data=tokens with data.tokens.eval_paths)")
    return plan
