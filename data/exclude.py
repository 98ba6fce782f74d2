"""`data.exclude`: samples a run leaves out of its training data, named in files.

A run stopped by a non-finite step (or one that skipped such steps) names the samples where the NaN arose, in its
log and in `<run_dir>/nonfinite.jsonl` (train/nonfinite.py). Resumed as it is, the run meets the same samples at the
same step again: its data order is a function of the seed and the position, which is what makes resumption exact.
`data.exclude=<file>[,<file>...]` leaves the samples those files name out of the training data from then on,
without moving anything else: every other sample stays where it was, so the resumed run's position and plans stay
valid.

What a file may hold, a sample per line (blank lines and lines starting with `//` are skipped):
- a sample key as the loader and the messages name it: `shard-000001.tar/clip_00042` (a video, image or text
  sample of the packed video loader; `webvid/shard-000001.tar/clip_00042` where another folder of the data has a
  shard of that name, docs/data.md "Sample keys": a key naming the shard by that name alone leaves out the sample of
  each such shard, as before folders were named, and the loader warns); `<token file>#<document number>` (a
  document of token files: the file prefix as the messages print it, or its base name, as the packed loader's keys
  name it, or a trailing part of its path, as they name two files of one base name: `a/web#4`);
- a JSON object: a line of `nonfinite.jsonl` (every sample its `samples` field names: a video pack's sample keys, a
  token stream's documents), a line of `spikes.jsonl` (the same of the whole step; with
  `data.exclude_spikes=suspect`, only its first suspect's samples: train/spikes.py rank_suspects), `{"sample":
  "<key>"}` or `{"document": ["<token file>", <number>]}`.
A file `<name>.jsonl` is read with `<name>.superseded.jsonl` beside it, if there is one: a resumed launch moves the
records of the steps it trains again there, and a run that names its own `nonfinite.jsonl` must still leave those
samples out when it is launched again (a preemption's requeue).

Where a left-out sample was: in a video pack, its place is closed up as a failed sample's is (the pack is padded at
its end); in a row of token files, its tokens are replaced by padding (id 0) and carry no loss: with document
bounds in place, so that the row's other documents keep their segments, without them moved to the row's end (the
other documents closed up), so that no document attends to them. Every other row stays as it was. Rows of the
synthetic text stream name no samples: nothing to leave out. Held-out sets are scored whole, as they are: the list
applies to the training data.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

_DOCUMENT = re.compile(r"^(.+)#(\d+)$")


def superseded_path(path: str) -> str:
    """Where a resumed launch moves the lines of a record file `<name>.jsonl` for the steps it trains again
    (train/metrics.py set_aside_redone): `<name>.superseded.jsonl`, which the list of samples reads too."""
    return path[:-len(".jsonl")] + ".superseded.jsonl"


class ExcludeError(ValueError):
    """A file of data.exclude that cannot be read as a list of samples; the message names the file and line."""


@dataclass
class ExcludeList:
    """The samples to leave out: `keys`, sample keys of the packed video loader (a token-file document of its mixture
    is `<base name>#<n>`), and `documents`, per token file (a prefix or a base name, as written), the document
    numbers named."""

    keys: frozenset = frozenset()
    documents: dict = field(default_factory=dict)
    files: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.keys or self.documents)

    def __len__(self) -> int:
        return len(self.keys | {f"{f}#{n}" for f, ns in self.documents.items() for n in ns})

    def keys_not_documents(self) -> set[str]:
        """The keys that name no token-file document (not `<file>#<number>`): samples of the packed video loader."""
        return {k for k in self.keys if not _DOCUMENT.match(k)}

    def documents_of(self, prefix: str) -> set[int]:
        """The document numbers named of the token file `prefix` (by its prefix, its base name, or a trailing part of
        its path: `web/part0` where two folders hold a `part0`)."""
        return set().union(*[ns for name, ns in self.documents.items() if names_file(name, prefix)])

    def pool_indices(self, prefixes: list[str], base) -> np.ndarray:
        """The documents named of token files `prefixes`, as indices of their pool (the pool index of file f's first
        document is `base[f]`), sorted; numbers past a file's end are left out (see unmatched_documents)."""
        out = [int(base[f]) + n for f, p in enumerate(prefixes) for n in self.documents_of(p)
               if int(base[f]) + n < int(base[f + 1])]
        return np.asarray(sorted(out), dtype=np.int64)

    def unmatched_documents(self, prefixes: list[str], base) -> list[str]:
        """The token documents named that none of `prefixes` holds: a file not among them or a number past its end."""
        held = {name: max([int(base[f + 1]) - int(base[f]) for f, p in enumerate(prefixes) if names_file(name, p)],
                          default=0) for name in self.documents}
        return [f"{name}#{n}" for name, ns in self.documents.items() for n in sorted(ns) if n >= held[name]]

    def ambiguous_documents(self, prefixes: list[str]) -> dict[str, list[str]]:
        """The token-file names of the list that fit several of `prefixes` (a base name that two folders' files
        share), each with those: their documents of that number are all left out."""
        out = {name: [p for p in prefixes if names_file(name, p)] for name in self.documents}
        return {name: ps for name, ps in out.items() if len(ps) > 1}

    def describe(self, *, token_documents: bool) -> str:
        """The start-up line's count: each entry once, under what it names in a run that reads token files'
        documents (`token_documents`: data.kind=tokens, or a video mixture's text_tokens) or not. A key
        `<file>#<n>` is a token-file document in the first (the streams read it as one) and a sample key in the
        second, where only the packed loader's keys match it."""
        named = {f"{f}#{n}" for f, ns in self.documents.items() for n in ns}
        documents = len(named) if token_documents else len(named - self.keys)
        return (f"{len(self)} sample(s) named in {', '.join(self.files)} ({len(self) - documents} sample key(s), "
                f"{documents} token-file document(s))")


def names_file(name: str, path: str) -> bool:
    """Whether `name` (a file as a list of samples names it) names the file `path`: it is the path, or the path
    ends with it, whole folder and file names (`web/part0` names /data/web/part0, `part0` too, `eb/part0` not)."""
    if name == path:
        return True
    want = [x for x in name.replace(os.sep, "/").split("/") if x not in ("", ".")]
    parts = path.replace(os.sep, "/").split("/")
    return bool(want) and parts[-len(want):] == want


def _add_document(docs: dict, name, n, where: str) -> None:
    if not isinstance(name, str) or not name or isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ExcludeError(f"{where}: a document is [<token file>, <number >= 0>], got {[name, n]!r}")
    docs.setdefault(name, set()).add(n)


def _add_key(keys: set, docs: dict, key, where: str) -> None:
    if not isinstance(key, str) or not key.strip():
        raise ExcludeError(f"{where}: a sample key is a non-empty string, got {key!r}")
    key = key.strip()
    keys.add(key)
    m = _DOCUMENT.match(key)
    if m:                       # also a token-file document, as a token stream numbers it
        docs.setdefault(m.group(1), set()).add(int(m.group(2)))


EXCLUDE_SPIKES = ("step", "suspect")   # data.exclude_spikes: what a spikes.jsonl record gives


def _add_record(keys: set, docs: dict, rec, where: str, spikes: str = "step") -> None:
    if not isinstance(rec, dict):
        raise ExcludeError(f"{where}: a JSON line must be an object, got {type(rec).__name__}")
    if "samples" in rec and "step" in rec:       # a line of nonfinite.jsonl or spikes.jsonl
        ranks = rec["samples"]
        if spikes == "suspect" and "spikes" in rec:   # a spiking step's first suspect alone
            suspects = rec.get("suspects") or []
            if not isinstance(suspects, list) or not suspects or not isinstance(suspects[0], dict):
                raise ExcludeError(f"{where}: data.exclude_spikes=suspect, but the spikes.jsonl record of step "
                                   f"{rec['step']} names no suspect (written before suspects were recorded, or its "
                                   f"loss was not known); data.exclude_spikes=step leaves out the whole step's data")
            ranks = {str(suspects[0].get("rank")): suspects[0].get("samples")}
        if not isinstance(ranks, dict):
            raise ExcludeError(f"{where}: a nonfinite.jsonl record's 'samples' must map ranks to their data")
        for r, data in ranks.items():
            for s in (data or {}).get("streams", []):
                for pack in s.get("packs", []):
                    for key in pack.get("samples", []):
                        _add_key(keys, docs, key, f"{where} (rank {r})")
                for d in s.get("documents", []):
                    if not isinstance(d, (list, tuple)) or len(d) != 2:
                        raise ExcludeError(f"{where} (rank {r}): a document is [<token file>, <number>], got {d!r}")
                    _add_document(docs, d[0], d[1], f"{where} (rank {r})")
        return
    if set(rec) == {"sample"}:
        _add_key(keys, docs, rec["sample"], where)
    elif set(rec) == {"document"}:
        d = rec["document"]
        if not isinstance(d, (list, tuple)) or len(d) != 2:
            raise ExcludeError(f"{where}: 'document' is [<token file>, <number>], got {d!r}")
        _add_document(docs, d[0], d[1], where)
    else:
        raise ExcludeError(f"{where}: a JSON line is a line of nonfinite.jsonl, {{\"sample\": <key>}} or "
                           f"{{\"document\": [<token file>, <number>]}}; got the keys {sorted(rec)}")


def read_exclude(spec: str, *, field_name: str = "data.exclude", spikes: str = "step") -> ExcludeList:
    """The samples named in the comma-separated files of `spec` (empty: none); of a spikes.jsonl record, the whole
    step's (`spikes`="step") or its first suspect's ("suspect"). ExcludeError naming the setting, the file and the
    line when a file is missing or a line is not a sample."""
    if spikes not in EXCLUDE_SPIKES:
        raise ExcludeError(f"data.exclude_spikes must be one of {EXCLUDE_SPIKES}, got {spikes!r}")
    files = [p.strip() for p in spec.split(",") if p.strip()] if spec else []
    keys: set = set()
    docs: dict = {}
    for path in files:
        if not os.path.isfile(path):
            raise ExcludeError(f"{field_name}: {path} is not a file (the samples to leave out: a nonfinite.jsonl or "
                               f"a list of sample keys, one per line)")
    # a run's record file moves the records of the steps a resumed launch trains again to <name>.superseded.jsonl
    # (train/metrics.py set_aside_redone): the samples they name stay named, whichever launch reads the list
    aside = [superseded_path(p) for p in files if p.endswith(".jsonl")]
    for path in files + [p for p in aside if os.path.isfile(p) and p not in files]:
        with open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                where = f"{field_name}: {path} line {i}"
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    raise ExcludeError(f"{where}: not UTF-8 ({e.reason} at byte {e.start}); the samples to leave "
                                       f"out are sample keys or JSON lines") from None
                if not line or line.startswith("//"):
                    continue
                if line.startswith("{"):
                    try:
                        rec = json.loads(line)
                    except ValueError as e:
                        raise ExcludeError(f"{where}: not JSON ({e}); a line cut short by a kill can be deleted") \
                            from None
                    _add_record(keys, docs, rec, where, spikes)
                else:
                    _add_key(keys, docs, line, where)
    return ExcludeList(keys=frozenset(keys), documents=docs, files=tuple(files))


def blank_pieces(tokens: np.ndarray, starts: list[int], hit: np.ndarray) -> np.ndarray:
    """Sets the tokens of a row's left-out pieces to 0 and returns their mask, both [S + 1]: `starts` as
    data/token_files.TokenSource.sample gives them (the positions where a document begins; the first piece begins at
    0, each later one at a start), `hit` [pieces] whether each piece's document is left out."""
    out = np.zeros(tokens.shape[0], dtype=bool)
    at = [0] + [s for s in starts if s > 0] + [tokens.shape[0]]        # where each piece begins, then the end
    for j in np.flatnonzero(hit):
        out[at[j]:at[j + 1]] = True
    tokens[out] = 0
    return out
