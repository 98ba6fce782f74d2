"""Pre-tokenized text corpora for a language model: megatron-core's indexed datasets (`PREFIX.bin` + `PREFIX.idx`).

The packed video loader (`data=text`) holds every text-only sample in every process's memory and tokenizes it at
plan time: right for a mixing corpus of millions of short documents, not for a pretraining corpus of billions of
tokens. This is the stream for that corpus:

- **Files:** megatron's indexed-dataset format, read through memory maps (megatron-core's `IndexedDataset`): an
  index of sequence lengths and byte offsets, and the token ids back to back. `launch/tokenize_text.py` writes
  them from JSONL (`write_token_files`), with the tokenizer's `<eos>` after each document and a sidecar
  `PREFIX.json` naming the tokenizer; files from Megatron-LM's `tools/preprocess_data.py` read as they are. Each
  sequence of the index is one document (as Megatron's GPT dataset takes them).
- **Samples of one source** (`TokenSource`): epoch e visits the documents in a seeded permutation; their tokens,
  concatenated in that order, are cut into samples of seq_length + 1 tokens overlapping by one (sample k covers
  tokens [kS, (k+1)S]), the epoch's tail shorter than a sample is dropped, and the samples of an epoch are taken in
  a second seeded permutation (so a long document's samples do not fill one global batch). Every token of every
  document is in the epoch but the tail's.
- **Blend** (`data.tokens.weights`, one weight per path): each path is a source with its own epochs; global sample
  i goes to the source whose cumulative-weight interval holds frac((i + 1) x golden ratio) (a Weyl sequence: every
  window of samples holds each source in proportion to its weight, within a sample or two), and is that source's
  next sample. Without weights the paths are one source: one pool of documents, each token once per epoch.
- **Position and resume:** a sample is a pure function of (seed, global index), so the position is one integer, as
  in the synthetic stream (data/sample_position.py): a step consumes the next G global samples and data-parallel
  rank r of R takes the r-th G/R of them. A resume continues exactly, under another data-parallel size or global
  batch size too. The state also records what the samples are a function of (the files by name and size, the
  weights, seq_length, seed, shuffle: `TokenCorpus.record`); a resume where one of them changed is refused
  (`TokenCorpus.resume`), as it would read other documents from the saved position, but for a blend's weights: each
  source goes on where it stopped, and the new weights give the shares from there (`continue_blend`).
- **Document bounds** (`data.tokens.document_bounds`, default on, micro-batch size 1): the row carries `cu_seqlens`,
  positions restart at each document, attention stays within it, and the label that would predict a document's
  first token from the document before it is not trained on. Off: Megatron's default rows ([mbs, S], positions
  0..S-1, attention across the documents of a row), any micro-batch size.

Memory per source: an epoch's order of the documents and their cumulative ends (12 bytes per document) and its order
of rows (8 per row); two epochs are held at an epoch's end. With `index_dir` (the trainer's default:
`<run_dir>/token_index`) they are files, written once by the first process of the node that needs them and
memory-mapped by every rank and worker: page cache, shared and reclaimable, instead of a copy in each process (at
10^8 documents, 1.2 GB per copy). Without it, or where the directory cannot be written, each process holds its own.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from data.exclude import ExcludeList, blank_pieces
from data.node_files import host_name, prune, shaped, shared_arrays
from data.sample_position import DataStateMismatch, GlobalSamplePosition
from data.video.annotations import unpaired_surrogate
from data.video.packing import DOC_KINDS
from data.video.shards import unique_tails

log = logging.getLogger(__name__)

FORMAT = "keye-token-files/1"      # the sidecar PREFIX.json that launch/tokenize_text.py writes
GOLDEN = 0x9E3779B9                # round(2^32 / golden ratio): the blend's Weyl step, odd
BLEND_CHECKPOINT = 1 << 16         # the blend keeps each source's count at every multiple of this many samples
INDEX_FORMAT = "keye-token-index/1"   # the epoch orders kept in index_dir (TokenSource._cached)
SHOWN_DOCUMENTS = 32               # of a step's documents, named in a message about the step


@dataclass
class TokenFilesConfig:
    """`data.tokens` (data.kind=tokens): megatron indexed datasets of token ids for a language model alone."""

    # comma-separated prefixes (PREFIX.bin + PREFIX.idx), directories (every *.idx in them) or globs of either;
    # empty: the run makes `synthetic_documents` synthetic text documents itself (CPU demo, tests)
    paths: str = ""
    # one blending weight per path (in the order `paths` names them, a directory or glob counting as one source);
    # empty: the paths form one pool of documents
    weights: list[float] = field(default_factory=list)
    # held-out prefixes for train.eval (same syntax), one pool, or several sets each scored on its own:
    # "NAME=PATH,NAME=PATH" (data/held_out.py); empty with synthetic data: a synthetic set under another seed
    eval_paths: str = ""
    document_bounds: bool = True
    shuffle: bool = True
    synthetic_documents: int = 2000
    # where each epoch's order of documents and rows is kept as files that every rank and worker of a node maps
    # (TokenSource._cached); empty: <run_dir>/token_index. Point it at a node-local disk on a shared filesystem
    # without file locks (the orders are then held in each process's memory, and the log says so)
    index_dir: str = ""

    def __post_init__(self) -> None:
        if self.weights:
            w = [float(x) for x in self.weights]
            n = len(split_paths(self.paths))
            if len(w) != n:
                raise ValueError(f"data.tokens.weights has {len(w)} weight(s) for {n} path(s) in data.tokens.paths="
                                 f"{self.paths!r}: give one weight per path, or none for one pool")
            if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
                raise ValueError(f"data.tokens.weights={w}: each must be >= 0 and finite, and their sum > 0")
        if self.synthetic_documents < 1:
            raise ValueError(f"data.tokens.synthetic_documents must be >= 1, got {self.synthetic_documents}")


def split_paths(spec: str) -> list[str]:
    return [p.strip() for p in str(spec or "").split(",") if p.strip()]


def _glob_prefixes(pattern: str) -> list[str]:
    """The prefixes that a glob's matches name: PREFIX.bin or PREFIX.idx, a directory's (every *.idx in it, as a
    directory of data.tokens.paths), or a prefix matched as itself. Other files name no prefix: the ones this tool
    writes beside a prefix (PREFIX.json, PREFIX.skipped.jsonl, PREFIX.lock, partial files) and any other ('/dir/*'
    stopped the launch with 'dir/a.json.bin and dir/a.json.idx do not exist')."""
    found = set()
    for m in glob.glob(pattern):
        if os.path.isdir(m):
            found.update(str(x)[:-4] for x in Path(m).glob("*.idx"))
        elif m.endswith((".bin", ".idx")):
            found.add(m[:-4])
        elif os.path.isfile(m + ".idx") or os.path.isfile(m + ".bin"):
            found.add(m)
    return sorted(found)


def resolve_prefixes(spec: str, *, field_name: str = "data.tokens.paths") -> list[list[str]]:
    """The dataset prefixes `spec` names, one list per comma-separated part (a directory or glob may name several):
    ValueError naming the part that names none, a prefix whose .bin or .idx is missing, or a prefix named twice (a
    directory and a prefix in it, 'a,a.bin', a link to a folder beside it): its documents would be read twice an
    epoch (as the launch refuses video shards named twice)."""
    out = []
    seen: dict[tuple[int, int], tuple[str, int, str]] = {}   # .idx (device, inode) -> (prefix, part's place, part)
    for k, part in enumerate(split_paths(spec)):
        p = Path(part).expanduser()
        if p.is_dir():
            found = sorted(str(x)[:-4] for x in p.glob("*.idx"))
        elif any(c in part for c in "*?["):
            found = _glob_prefixes(str(p))
        else:
            found = [str(p)[:-4] if str(p).endswith((".idx", ".bin")) else str(p)]
        if not found:
            raise ValueError(f"{field_name}={spec!r}: {part!r} names no indexed dataset (PREFIX.bin + PREFIX.idx, "
                             f"written by launch/tokenize_text.py)")
        for prefix in found:
            missing = [s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
            if missing:
                what = f"{prefix}{missing[0]} does not exist" if len(missing) == 1 else \
                    f"{prefix}.bin and {prefix}.idx do not exist"
                raise ValueError(f"{field_name}={spec!r}: {what} (an indexed dataset is PREFIX.bin + PREFIX.idx, "
                                 f"written by launch/tokenize_text.py)")
            st = os.stat(prefix + ".idx")
            first = seen.setdefault((st.st_dev, st.st_ino), (prefix, k, part))
            if first[:2] != (prefix, k):
                what = (f"{prefix} is named twice, by {first[2]!r} and by {part!r}" if first[0] == prefix else
                        f"{first[0]} (named by {first[2]!r}) and {prefix} (by {part!r}) are the same files")
                raise ValueError(f"{field_name}={spec!r}: {what}: its documents would be read twice an epoch. Name "
                                 f"each prefix once")
        out.append(found)
    return out


def empty_prefix(prefix: str) -> str | None:
    """What is wrong with a token-file prefix that holds no token (its .bin empty, e.g. tokenized from no document:
    megatron then fails with 'cannot mmap an empty file', naming none), else None."""
    try:
        empty = os.path.getsize(prefix + ".bin") == 0
    except OSError:
        return None                   # a missing file is reported by whoever opens it, naming it
    return (f"{prefix}.bin is empty: no token in this prefix (was it tokenized from no document, e.g. with the wrong "
            f"--key?)") if empty else None


INDEX_HEADER = b"MMIDIDX\x00\x00"   # megatron's .idx: magic, version <Q (1), dtype code <B, sequences <Q, documents <Q
INDEX_HEAD = len(INDEX_HEADER) + 8 + 1 + 8 + 8


def damaged_prefix(prefix: str) -> str | None:
    """What is wrong with a prefix whose .idx is not megatron's index or is cut short, or whose .bin is not as long as
    its .idx says (the last sequence's pointer plus its length in items): an interrupted copy. Megatron reads such
    files without a check, failing with 'buffer is smaller than requested size' (naming no file) at the launch or at
    the first row past the cut, mid-run. None for a whole prefix, or one whose file is missing (whoever opens it
    names it)."""
    import struct

    from megatron.core.datasets.indexed_dataset import DType

    idx, again = prefix + ".idx", "copy the prefix again, or write it again with launch/tokenize_text.py"
    try:
        with open(idx, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(INDEX_HEAD)
            if len(head) < INDEX_HEAD or not head.startswith(INDEX_HEADER):
                what = "cut short in its header" if INDEX_HEADER.startswith(head[:len(INDEX_HEADER)]) else \
                    "another header"
                return f"{idx} is not a megatron indexed-dataset index ({size} bytes, {what}): {again}"
            version, code, sequences, documents = struct.unpack("<QBQQ", head[len(INDEX_HEADER):])
            if version != 1 or code not in {d.value for d in DType}:
                return f"{idx}: version {version}, dtype code {code}: not an index megatron-core reads: {again}"
            need = INDEX_HEAD + sequences * (4 + 8) + documents * 8
            if size < need:
                return (f"{idx} holds {size} bytes, fewer than the {need} its header's {sequences} sequences and "
                        f"{documents} document indices take: it was cut short (an interrupted copy?): {again}")
            itemsize = DType.size(code)
            expect = 0
            if sequences:
                f.seek(INDEX_HEAD + (sequences - 1) * 4)
                last = struct.unpack("<i", f.read(4))[0]
                f.seek(INDEX_HEAD + sequences * 4 + (sequences - 1) * 8)
                expect = struct.unpack("<q", f.read(8))[0] + last * itemsize
        bin_size = os.path.getsize(prefix + ".bin")
    except OSError:
        return None
    if bin_size == expect:
        return None
    why = ("cut short (an interrupted copy?)" if bin_size < expect else
           "longer than its index says (a .bin of another writing than its .idx?)")
    return (f"{prefix}.bin holds {bin_size} bytes, but {idx} indexes {expect} ({sequences} sequences of "
            f"{DType.dtype_from_code(code).__name__}): the .bin is {why}: {again}")


FINGERPRINT_BLOCK = 4096      # bytes read at each of a file's sampled places (content_fingerprint): a page
FINGERPRINT_PLACES = 8        # places between the first and the last block, evenly spread


def content_fingerprint(prefixes: list[str]) -> str:
    """A cheap fingerprint of the datasets' contents, to tell copies of them apart across nodes: each .idx's and
    .bin's size and a hash of its first and last FINGERPRINT_BLOCK bytes and of FINGERPRINT_PLACES blocks evenly
    spread between (at most 40 KiB read per file, whatever its size: every rank reads them at the launch, the ranks of
    a node through one page cache). Copies that differ only outside those blocks read as the same: what it catches
    is another tokenization, another version or order of the documents, a copy cut short or written over there."""
    h = hashlib.sha1()
    for prefix in prefixes:
        for suffix in (".idx", ".bin"):
            with open(prefix + suffix, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                h.update(f"{suffix}:{size}".encode())
                last = max(0, size - FINGERPRINT_BLOCK)
                for at in sorted({0, last, *(last * k // (FINGERPRINT_PLACES + 1)
                                             for k in range(1, FINGERPRINT_PLACES + 1))}):
                    f.seek(at)
                    h.update(f.read(FINGERPRINT_BLOCK))
    return h.hexdigest()[:16]


def count_tokens(prefixes: list[str]) -> tuple[int, int]:
    """(tokens, documents) that the datasets `prefixes` hold together, read from their .idx files."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = documents = 0
    for p in prefixes:
        ds = IndexedDataset(p, mmap=True)   # kept while its lengths are read: they are a view of its map
        tokens += int(np.sum(ds.sequence_lengths, dtype=np.int64))
        documents += len(ds.sequence_lengths)
    return tokens, documents


def sidecar(prefix: str) -> dict | None:
    """The PREFIX.json that launch/tokenize_text.py wrote beside a dataset (None for files written elsewhere: a
    PREFIX.json that is not a JSON object with the sidecar's "format", e.g. the JSON lines a corpus was tokenized
    from, is someone else's file, not a reason to stop the launch)."""
    p = Path(prefix + ".json")
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_bytes())
    except (ValueError, RecursionError):   # not JSON (JSON lines, not UTF-8) or nested past the parser
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def specials_as_ids(field_name: str, prefixes: list[str]) -> str | None:
    """A warning naming the files of `prefixes` that launch/tokenize_text.py wrote with a Hugging Face tokenizer before
    it read a line's special tokens as text (a sidecar without `specials_in_text`), None when there are none: a line
    that spelled "<|endoftext|>" or "<|im_end|>" holds that token's id in them."""
    old = [p for p in prefixes if (m := sidecar(p)) is not None and "specials_in_text" not in m
           and str(m.get("tokenizer", "")).startswith("HFTokenizer(")]
    if not old:
        return None
    return (f"{field_name}: {len(old)} token file(s) ({old[0]}{', ...' if len(old) > 1 else ''}) were written by "
            f"launch/tokenize_text.py with a Hugging Face tokenizer before it read a line's special tokens as text "
            f"(their sidecar has no specials_in_text): a line that spells '<|endoftext|>' or '<|im_end|>' holds that "
            f"token's id there (a document or turn end inside the text), where files written now hold its characters. "
            f"They are read as written; write them again with launch/tokenize_text.py to train on such text as text")


# ---- writing ------------------------------------------------------------------------------------------------

def write_token_files(documents: Iterable[list[int]], prefix: str | os.PathLike, *, vocab_size: int,
                      meta: dict | Callable[[], dict] | None = None, replace: bool = True) -> dict:
    """Writes `documents` (lists of token ids, each written as one sequence) as megatron's PREFIX.bin + PREFIX.idx
    with the narrowest dtype that holds `vocab_size` ids, and PREFIX.json (the sidecar: counts plus `meta`, or what
    `meta()` returns once every document is written). The files appear under their names only once complete
    (written beside them, then renamed; the .idx last, so a prefix whose .idx exists is whole), under a lock on the
    prefix (write_token_runs). Returns the sidecar."""
    def runs():
        for ids in documents:
            arr = np.asarray(ids, dtype=np.int64)
            yield arr, np.array([arr.size], dtype=np.int64)
    return write_token_runs(runs(), prefix, vocab_size=vocab_size, meta=meta, replace=replace)


class PrefixBusy(OSError):
    """Another process is writing the prefix (it holds PREFIX.lock): a second writer would write over its files."""


OUTPUTS = (".bin", ".idx", ".json", ".skipped.jsonl")   # what writing a prefix leaves there (tokenize_jsonl)


def _is_partial(name: str, base: str) -> bool:
    """Whether the file name `name` is a file written beside a prefix whose file name is `base` before its rename
    (PREFIX.bin.HOST.PID.partial; PREFIX.bin.partial from an earlier version)."""
    return re.fullmatch(re.escape(base) + r"\.(bin|idx|json)(\..+\.\d+)?\.partial", name) is not None


def written_over(prefix: str, inputs: Iterable[str | os.PathLike]) -> tuple[str, str] | None:
    """(input, output) where one of `inputs` is a file that writing `prefix` replaces, truncates or removes (its
    .bin, .idx, .json, .skipped.jsonl, lock or partial files), by real path or as the same file (a link); else None.
    `--input ow/web.json --out ow/web` replaced the input with the sidecar."""
    names = [prefix + s for s in (*OUTPUTS, ".lock")]
    real = {os.path.realpath(n): n for n in names}
    where = os.path.realpath(os.path.dirname(os.path.abspath(prefix)))
    for path in map(str, inputs):
        path_real = os.path.realpath(path)
        if path_real in real:
            return path, real[path_real]
        for n in names:
            try:
                if os.path.samefile(path, n):
                    return path, n
            except OSError:     # either is missing
                pass
        if os.path.dirname(path_real) == where and _is_partial(os.path.basename(path_real), os.path.basename(prefix)):
            return path, path_real
    return None


@contextmanager
def _writing(prefix: str):
    """Holds PREFIX.lock (an exclusive flock, not waited for) while the prefix is written: a second writer of the same
    prefix is refused (PrefixBusy, naming the holder's host and pid) instead of truncating the first's files under it
    and both reporting success. The lock file says who holds it and goes when the write ends; partial files a writer
    killed before left beside the prefix go when the lock is taken (no writer holds them). On a filesystem without
    flock the write goes on unlocked (the log says so): each writer's partial files have names of its own."""
    import fcntl

    path = prefix + ".lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = Path(path).read_text()[:200].strip()
            except OSError:
                holder = ""
            who = holder or "a process that has not written its pid yet"
            raise PrefixBusy(f"{prefix}: another process is writing this prefix ({who} holds {path}); two writers "
                             f"at once write over each other's files. Wait for it to end, or give another "
                             f"prefix") from None
        except OSError as e:
            os.close(fd)
            log.warning("%s: cannot lock %s (%s): writing without a lock; do not write this prefix from two "
                        "processes at once", prefix, path, e)
            fd = None
            break
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)   # its holder removed it as it finished, between our open and our lock: take the new one
    if fd is not None:
        os.ftruncate(fd, 0)
        os.write(fd, f"host {host_name()} pid {os.getpid()}\n".encode())
        base = os.path.basename(prefix)
        for stale in glob.glob(glob.escape(prefix) + ".*.partial"):
            if _is_partial(os.path.basename(stale), base):
                os.unlink(stale)
    try:
        yield
    finally:
        if fd is not None:
            try:
                os.unlink(path)   # before the lock goes: a writer that opened it meanwhile sees it gone (samestat)
            except OSError:
                pass
            os.close(fd)


def write_token_runs(runs: Iterable[tuple[np.ndarray, np.ndarray]], prefix: str | os.PathLike, *, vocab_size: int,
                     meta: dict | Callable[[], dict] | None = None, replace: bool = True) -> dict:
    """`write_token_files` for documents that come in runs: (their tokens back to back, their lengths), one write
    per run. Empty documents are left out. The prefix is locked for the whole write (`_writing`: PrefixBusy where
    another process writes it); replace=False: FileExistsError where PREFIX.idx exists once the lock is held."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = str(prefix)
    if not os.path.basename(prefix) or os.path.isdir(prefix):
        raise ValueError(f"{prefix}: names a directory; a prefix is what the files' names begin with (PREFIX.bin, "
                         f"PREFIX.idx, PREFIX.json): give e.g. {os.path.join(prefix, 'web')}")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(vocab_size)
    # names of this process's own: a writer that the lock does not stop (no flock there) does not write into them
    tmp_bin, tmp_idx, tmp_json = (f"{prefix}{s}.{host_name()}.{os.getpid()}.partial" for s in (".bin", ".idx", ".json"))
    with _writing(prefix):
        if not replace and os.path.exists(prefix + ".idx"):
            raise FileExistsError(f"{prefix}.idx exists (written while this process started): give another prefix "
                                  f"or remove it")
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        n_docs = n_tokens = longest = 0
        try:
            for tokens, lengths in runs:
                lengths = np.asarray(lengths, dtype=np.int64)
                if tokens.size:
                    bad = (tokens < 0) | (tokens >= vocab_size)
                    if bad.any():
                        at = int(np.argmax(bad))
                        doc = n_docs + int(np.count_nonzero(np.cumsum(lengths[lengths > 0]) <= at))
                        raise ValueError(f"{prefix}: document {doc} holds id {int(tokens[at])}, outside the "
                                         f"vocabulary (0..{vocab_size - 1})")
                kept = lengths[lengths > 0]
                if kept.size:
                    builder.add_document(torch.from_numpy(np.ascontiguousarray(tokens)), kept.tolist())
                    n_docs, n_tokens = n_docs + kept.size, n_tokens + int(kept.sum())
                    longest = max(longest, int(kept.max()))
            builder.finalize(tmp_idx)
            info = {"format": FORMAT, "vocab_size": int(vocab_size), "dtype": np.dtype(dtype).name,
                    "documents": n_docs, "tokens": n_tokens, "longest_document": longest,
                    **((meta() if callable(meta) else meta) or {})}
            Path(tmp_json).write_text(json.dumps(info, indent=1) + "\n")
        except BaseException:               # a failed write leaves nothing behind, not even its partial files
            builder.data_file.close()
            for p in (tmp_bin, tmp_idx, tmp_json):
                if os.path.exists(p):
                    os.unlink(p)
            raise
        os.replace(tmp_bin, prefix + ".bin")
        os.replace(tmp_json, prefix + ".json")
        os.replace(tmp_idx, prefix + ".idx")
    return info


def _line_text(raw: bytes, key: str) -> tuple[str | None, str]:
    """A JSONL line's `key` string: (text, ""); a line left out: (None, why); a blank line: (None, "")."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 ({e.reason} at byte {e.start})"
    if not line.strip():
        return None, ""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg}, column {e.colno})"
    except RecursionError:   # arrays or objects nested past the parser's depth: one bad line, not the whole run
        return None, "not JSON (nested too deeply)"
    value = rec.get(key) if isinstance(rec, dict) else None
    if isinstance(value, str) and value:
        if (bad := unpaired_surrogate(value, repr(key))) is not None:   # a tokenizer would fail on it, ending the run
            return None, bad
        return value, ""
    return None, ("not a JSON object" if not isinstance(rec, dict) else
                  f"no {key!r} field" if key not in rec else
                  f"{key!r} is empty" if value == "" else f"{key!r} is a {type(value).__name__}, not a string")


def _jsonl_chunks(inputs: Iterable[str | os.PathLike], lines: int) -> Iterator[tuple[str, int, list[bytes]]]:
    """The lines of JSONL files (.jsonl or .jsonl.gz) as undecoded bytes, `lines` at a time: (file, the first's line
    number, lines). Each line is decoded alone (`_line_text`), so a bad byte costs its own line only. A UTF-8 byte
    order mark opening a file (as Windows tools write them) is left out, as utf-8-sig decodes it: else line 1 read
    as 'not JSON'."""
    import codecs
    import gzip
    import zlib

    for path in inputs:
        path = str(path)
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            first, chunk = 1, []
            try:
                for raw in f:
                    if first == 1 and not chunk and raw.startswith(codecs.BOM_UTF8):   # the file's first line
                        raw = raw[len(codecs.BOM_UTF8):]
                    chunk.append(raw)
                    if len(chunk) == lines:
                        yield path, first, chunk
                        first, chunk = first + lines, []
            except (OSError, EOFError, zlib.error) as e:   # a truncated or foreign .gz: the rest cannot be read
                raise OSError(f"{path}: unreadable after line {first - 1 + len(chunk)} "
                              f"({type(e).__name__}: {e})") from e
            if chunk:
                yield path, first, chunk


def _tokenize_chunk(chunk: tuple[str, int, list[bytes]], tokenizer, key: str,
                    tail: list[int]) -> tuple[tuple[np.ndarray, np.ndarray], list[dict]]:
    """One chunk of `_jsonl_chunks`: ((the usable lines' token ids back to back, `tail` after each, int32; their
    lengths), the lines left out, as {"file", "line", "reason"})."""
    path, first, lines = chunk
    texts, skipped = [], []
    for i, raw in enumerate(lines):
        text, reason = _line_text(raw, key)
        if text is not None:
            texts.append(text)
        elif reason:
            skipped.append({"file": path, "line": first + i, "reason": reason})
    encode_batch = getattr(tokenizer, "encode_batch", None)
    ids = encode_batch(texts) if encode_batch is not None else [tokenizer.encode(t) for t in texts]
    from itertools import chain

    lengths = np.array([len(x) + len(tail) for x in ids], dtype=np.int64)
    flat = np.fromiter(chain.from_iterable(chain.from_iterable((x, tail) for x in ids)), count=int(lengths.sum()),
                       dtype=np.int32 if tokenizer.vocab_size < 2**31 else np.int64)
    return (flat, lengths), skipped


_WORKER: dict = {}   # a tokenize_jsonl worker process's tokenizer, key and tail (set once by _start_worker)


def _start_worker(tokenizer, key: str, tail: list[int], caller: int | None = None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one thread per worker: the processes are the parallelism
    _WORKER.update(tokenizer=tokenizer, key=key, tail=tail)
    if caller is not None:
        import threading

        threading.Thread(target=_exit_with, args=(caller,), daemon=True, name="tokenize-caller-watch").start()


def _exit_with(pid: int) -> None:
    """Ends this worker process once process `pid` (the caller of tokenize_jsonl) has ended. A caller killed (SIGKILL,
    or SIGTERM, which Python does not catch) shuts no pool down, and its workers, children of the fork server, waited
    on their queues' pipes forever: each holds both ends of them, so no end-of-file comes. With the workers gone the
    fork server and resource tracker end too (the workers held the fork server's 'alive' pipe open). Waits on a
    pidfd; where there is none (Linux before 5.3), polls the pid each second."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):   # no pidfd here, or the caller has already ended (ProcessLookupError)
        fd = None
    if fd is not None:
        select.select([fd], [], [])     # readable once the process has ended
    else:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:      # alive, another user's (not a caller of ours, but not ended either)
                pass
            time.sleep(1.0)
    os._exit(1)


def _tokenize_in_worker(chunk):
    return _tokenize_chunk(chunk, **_WORKER)


class TokenizeWorkerDied(RuntimeError):
    """A tokenize_jsonl worker process ended mid-chunk (killed, or out of memory): nothing of the output is kept."""


def _tokenized_chunks(inputs, tokenizer, key: str, tail: list[int], lines: int,
                      workers: int) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], list[dict]]]:
    """`_tokenize_chunk` of each chunk of `inputs`, in their order: in this process, or over `workers` processes
    with at most 2 x workers chunks in flight (the files are read no further ahead than that).

    The workers are forked from a fork server (a fresh process that imported this module), not from this process: a
    child forked from a process with other threads (pytest's, a tokenizer's, a training job's) may start with a lock
    one of them held and wait on it forever, and so would `get()` on its chunk. A worker that dies is an error
    (TokenizeWorkerDied), not a wait without end as under multiprocessing.Pool."""
    chunks = _jsonl_chunks(inputs, lines)
    if workers <= 1:
        yield from (_tokenize_chunk(c, tokenizer, key, tail) for c in chunks)
        return
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])   # each worker forked with numpy, torch and this module imported
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                               initargs=(tokenizer, key, tail, os.getpid()))   # the workers end with this process
    try:
        pending: deque = deque()
        for c in chunks:
            pending.append(pool.submit(_tokenize_in_worker, c))
            while len(pending) >= 2 * workers or (pending and pending[0].done()):
                yield _chunk_result(pending.popleft())
        while pending:
            yield _chunk_result(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _chunk_result(future):
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool as e:
        raise TokenizeWorkerDied(f"a tokenize worker process ended while tokenizing ({e}): killed, or out of "
                                 f"memory? Run again with fewer --workers; nothing of this output is kept") from None


def tokenize_jsonl(inputs: list[str], prefix: str | os.PathLike, tokenizer, *, key: str = "text",
                   append_eos: bool = True, batch: int = 1000, workers: int = 1, replace: bool = True) -> dict:
    """Tokenizes the `key` text of each line of `inputs` (JSONL) into one indexed dataset at `prefix`, one document
    per line with `<eos>` after it, in the lines' order; `batch` lines at a time, over `workers` processes. Lines
    without usable text are left out, listed in PREFIX.skipped.jsonl (file, line, reason) and counted in the
    sidecar. Returns the sidecar. ValueError where an input is one of the files written at `prefix` (written_over)."""
    prefix = str(prefix)
    if (hit := written_over(prefix, inputs)) is not None:
        raise ValueError(f"{hit[0]}: is {hit[1]}, a file that writing {prefix} replaces: give another prefix")
    skipped: list[dict] = []
    tail = [tokenizer.eos_id] if append_eos else []

    def runs():
        for run, left_out in _tokenized_chunks(inputs, tokenizer, key, tail, batch, workers):
            skipped.extend(left_out)
            yield run

    def meta() -> dict:   # once every line is read: the lines left out are known, and listed before the .idx
        with open(prefix + ".skipped.jsonl", "w") as f:
            for s in skipped:
                f.write(json.dumps(s) + "\n")
        out = {"tokenizer": repr(tokenizer), "eos_id": tokenizer.eos_id if append_eos else None, "key": key,
               "inputs": [str(p) for p in inputs], "skipped_lines": len(skipped)}
        # a text's "<|endoftext|>" written as text (files written before: its id)
        if getattr(tokenizer, "specials_in_text", None):
            out["specials_in_text"] = tokenizer.specials_in_text
        return out

    return write_token_runs(runs(), prefix, vocab_size=tokenizer.vocab_size, meta=meta, replace=replace)


def synthetic_documents(n: int, seed: int, *, held_out_from: tuple[int, int] | None = None) -> Iterator[str]:
    """`n` text documents from (seed, i): one to eight of the synthetic counting passages
    (data/video/synthetic.text_record) joined, 80 to 1,000 bytes, so that documents both share rows and run over
    several. held_out_from=(seed, count) of a training set's documents: those equal to one of them are skipped
    (the next i taken), so that a held-out set holds no training document (a lone question of two seeds coincides
    now and then: one of the tiny recipe's 500 held-out documents was also trained on)."""
    from data.video.synthetic import apart_from, text_record

    def document(i: int, seed: int) -> str:
        k = 1 + int(np.random.default_rng([seed, 104729, i]).integers(0, 8))
        parts = []
        for j in range(k):
            r = text_record(i * 8 + j, seed)
            parts.append(r["text"] if "text" in r else f"{r['prompt']} {r['qa'][0]['question']} {r['qa'][0]['answer']}")
        return " ".join(parts)

    yield from apart_from(document, n, seed, held_out_from)


def write_synthetic_token_files(prefix: str | os.PathLike, n_documents: int, seed: int, tokenizer, *,
                                append_eos: bool = True, held_out_from: tuple[int, int] | None = None,
                                replace: bool = True) -> dict:
    """`n_documents` synthetic documents (synthetic_documents; held_out_from: none of that training set's)
    tokenized with `tokenizer` at `prefix`, `<eos>` after each unless `append_eos` is false; returns the sidecar."""
    tail = [tokenizer.eos_id] if append_eos else []
    docs = synthetic_documents(n_documents, seed, held_out_from=held_out_from)
    return write_token_files((tokenizer.encode(t) + tail for t in docs), prefix,
                             vocab_size=tokenizer.vocab_size, meta={"tokenizer": repr(tokenizer),
                                                                    "eos_id": tail[0] if tail else None,
                                                                    "source": f"synthetic, seed {seed}"},
                             replace=replace)


def ensure_synthetic_token_files(directory: str | os.PathLike, n_documents: int, seed: int, *, rank: int,
                                 vocab_size: int, timeout_s: float = 600.0,
                                 held_out_from: tuple[int, int] | None = None) -> str:
    """The prefix of `n_documents` synthetic documents tokenized with the byte tokenizer (`<eos>` after each),
    written under `directory` by rank 0 once; the other ranks wait for the .idx (written last). held_out_from:
    (seed, count) of the training documents that a held-out set's leaves out."""
    from data.video.tokenizer import ByteTokenizer

    prefix = str(Path(directory) / f"synthetic_{n_documents}_seed{seed}")
    if rank == 0 and not os.path.isfile(prefix + ".idx"):
        try:
            write_synthetic_token_files(prefix, n_documents, seed, ByteTokenizer(vocab_size=vocab_size),
                                        held_out_from=held_out_from)
        except PrefixBusy:   # another run's rank 0 writes the same files (the same name, the same documents): wait
            pass
    deadline = time.time() + timeout_s
    while not os.path.isfile(prefix + ".idx"):
        if time.time() > deadline:
            raise TimeoutError(f"rank {rank}: synthetic token files {prefix} not ready after {timeout_s:.0f} s")
        time.sleep(0.2)
    return prefix


# ---- reading ------------------------------------------------------------------------------------------------

class TokenSource:
    """The documents of one or more datasets as one pool, cut into samples of `seq_length` + 1 tokens (the module
    docstring): `sample(j)` -> (tokens int64 [S + 1], starts: the positions in it where a document begins, 0
    included when one begins there)."""

    def __init__(self, prefixes: list[str], *, seq_length: int, seed: int, source_id: int, shuffle: bool = True,
                 vocab_size: int | None = None, index_dir: str | os.PathLike | None = None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefixes, self.S, self.seed, self.source_id, self.shuffle = list(prefixes), seq_length, seed, source_id, shuffle
        self.vocab_size = vocab_size
        for p in self.prefixes:   # a damaged prefix before an empty one: a .bin cut to nothing is not "no document"
            if (why := damaged_prefix(p) or empty_prefix(p)) is not None:
                raise ValueError(why)
        self.datasets = [IndexedDataset(p, mmap=True) for p in self.prefixes]
        # the lengths stay in the .idx maps (megatron reads them zero-copy): nothing per document is held here
        counts = [len(ds.sequence_lengths) for ds in self.datasets]
        self.base = np.cumsum([0] + counts)                           # first document of each dataset
        self.documents = int(self.base[-1])
        self.tokens = sum(int(np.sum(ds.sequence_lengths, dtype=np.int64)) for ds in self.datasets)
        self.per_epoch = (self.tokens - 1) // seq_length if self.tokens > seq_length else 0
        if self.per_epoch < 1:
            raise ValueError(f"{', '.join(self.prefixes)}: {self.tokens} tokens in {self.documents} documents, "
                             f"fewer than one sample of train.seq_length + 1 = {seq_length + 1}")
        self._epochs: dict[int, tuple] = {}
        self._idx = np.int32 if self.documents < 2**31 else np.int64
        self.index_dir = Path(index_dir, self._index_key()) if index_dir else None
        self.index_note = ""   # why the orders are held in memory though index_dir was given (the log says it once)
        self.released = 0      # index_dir's files of epochs before this one are removed (release)
        self.left_out = np.zeros(0, dtype=np.int64)   # pool indices of documents data.exclude names (leave_out)

    def _index_key(self) -> str:
        """The directory name of this source's epoch orders: what they are a function of (the files, by path, size and
        modification time, the row length, the seed, the source's place and the shuffle)."""
        files = []
        for prefix in self.prefixes:
            for suffix in (".idx", ".bin"):
                st = os.stat(prefix + suffix)
                files.append([os.path.realpath(prefix + suffix), st.st_size, st.st_mtime_ns])
        blob = json.dumps({"format": INDEX_FORMAT, "files": files, "seq_length": self.S, "seed": self.seed,
                           "source_id": self.source_id, "shuffle": self.shuffle})
        return f"{os.path.basename(self.prefixes[0])}-{hashlib.sha1(blob.encode()).hexdigest()[:16]}"

    def _build(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Epoch e's (order: the documents in the order visited, ends: the cumulative token count after each of them,
        rows: the epoch's samples in the order taken)."""
        lengths = np.concatenate([np.asarray(ds.sequence_lengths, dtype=np.int64) for ds in self.datasets])
        if self.shuffle:
            rng = np.random.default_rng([self.seed, 7717, self.source_id, e])
            order = rng.permutation(self.documents).astype(self._idx)
            rows = rng.permutation(self.per_epoch).astype(np.int64)
        else:
            order, rows = np.arange(self.documents, dtype=self._idx), np.arange(self.per_epoch, dtype=np.int64)
        ends = np.cumsum(lengths[order])
        return order, ends, rows

    def _check(self, got: tuple) -> bool:
        return shaped(got, [(self.documents, self._idx), (self.documents, np.int64), (self.per_epoch, np.int64)])

    def _cached(self, e: int):
        """Epoch e's arrays from index_dir (data/node_files.shared_arrays: mapped where a process of the node, or an
        earlier run, wrote them, else built once under a file lock). Where the directory cannot be written or locked,
        they are built and held in this process's memory, as without index_dir. Old epochs' files go by `release`."""
        got, note = shared_arrays(self.index_dir, f"epoch{e}", ("order", "ends", "rows"), lambda: self._build(e),
                                  self._check)
        if note and not self.index_note:
            self.index_note = note
            log.warning("token files %s: the epoch orders cannot be kept in %s (%s); each process holds its own "
                        "(%d bytes per document)", ", ".join(self.prefixes), self.index_dir, note,
                        np.dtype(self._idx).itemsize + 8)
        return got

    def release(self, keep_from: int) -> None:
        """Removes index_dir's files of the epochs before `keep_from`: the caller knows that no process of the run
        reads them again (on a shared filesystem another node may map them: a file removed under its map there is
        ESTALE, or SIGBUS in the reader, on NFS). Each process's maps of them go with `_epochs` as it moves on."""
        if self.index_dir is not None and not self.index_note and keep_from > self.released:
            prune(self.index_dir, "epoch", keep_from)
            self.released = keep_from

    def _epoch(self, e: int):
        got = self._epochs.get(e)
        if got is None:
            got = self._cached(e) if self.index_dir is not None else self._build(e)
            if len(self._epochs) >= 2:            # the stream moves forward: the current epoch and the next
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = got
        return got

    def _file_of(self, doc: int) -> tuple[int, int]:
        """A pool index as (its dataset's place in the pool, its document number in that dataset)."""
        f = int(np.searchsorted(self.base, doc, side="right")) - 1
        return f, doc - int(self.base[f])

    def _read(self, doc: int, offset: int, count: int) -> np.ndarray:
        f, n = self._file_of(doc)
        return self.datasets[f].get(n, offset=offset, length=count)

    def sample(self, j: int) -> tuple[np.ndarray, list[int], list[int]]:
        """Sample j of this source: (tokens [S + 1] int64, starts, documents: the pool index of each document piece
        in the sample, in order; with document bounds, piece d is the row's segment d, for d below their count)."""
        e, k = divmod(int(j), self.per_epoch)
        order, ends, rows = self._epoch(e)
        g = int(rows[k]) * self.S                     # the sample's first token in the epoch's concatenation
        p = int(np.searchsorted(ends, g, side="right"))  # the document holding it, by position in the order
        need, out, starts, docs, at = self.S + 1, [], [], [], 0
        while need:
            doc, end = int(order[p]), int(ends[p])
            begin = int(ends[p - 1]) if p else 0
            offset = g + at - begin
            take = min(need, end - begin - offset)
            if take:   # an empty document (megatron's files may hold them) is no piece: pieces are the row's segments
                starts += [at] * (offset == 0)
                out.append(self._read(doc, offset, take))
                docs.append(doc)
            need, at, p = need - take, at + take, p + 1
        if self.vocab_size is not None:
            for doc, piece in zip(docs, out):
                if piece.size and int(piece.max()) >= self.vocab_size:
                    prefix, n = self.document_name(doc)
                    raise ValueError(f"{prefix}: document {n} holds token id "
                                     f"{int(piece.max())}, outside model.lm.vocab_size ({self.vocab_size}): the files "
                                     f"were tokenized for another vocabulary")
        tokens = np.concatenate(out).astype(np.int64)
        return tokens, starts, docs

    def pieces(self, j: int) -> list[tuple[int, int, int, int]]:
        """Sample j's document pieces in order, as `sample` cuts them: (pool index, the piece's first token's offset
        in its document, its tokens in the sample, the document's length). A piece whose offset is not 0, or that
        ends before its document does, is a cut: the document goes on in another sample."""
        e, k = divmod(int(j), self.per_epoch)
        order, ends, rows = self._epoch(e)
        g = int(rows[k]) * self.S
        p = int(np.searchsorted(ends, g, side="right"))
        need, at, out = self.S + 1, 0, []
        while need:
            begin, end = (int(ends[p - 1]) if p else 0), int(ends[p])
            offset = g + at - begin
            take = min(need, end - begin - offset)
            if take:
                out.append((int(order[p]), offset, take, end - begin))
            need, at, p = need - take, at + take, p + 1
        return out

    def document_name(self, doc: int) -> tuple[str, int]:
        """A pool index as (the file prefix holding it, its document number in that file)."""
        f, n = self._file_of(doc)
        return self.prefixes[f], n

    def leave_out(self, exclude: ExcludeList) -> set[str]:
        """Leaves the documents `exclude` names out of this source's rows from now on (data/exclude.py: their tokens
        become padding without loss; no other row changes); returns the documents named that this source does not
        hold."""
        self.left_out = exclude.pool_indices(self.prefixes, self.base)
        return set(exclude.unmatched_documents(self.prefixes, self.base))

    def row(self, j: int, *, document_bounds: bool) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
        """Sample j as a training row (row_tensors), the documents left out blanked (in place with document bounds,
        else moved to the row's end); the pool index of each of its pieces (TokenSource.sample); and those of the
        pieces left out."""
        tokens, starts, docs = self.sample(j)
        hit = np.isin(docs, self.left_out) if len(self.left_out) else None   # nothing left out: no work per row
        blank = blank_pieces(tokens, starts, hit) if hit is not None and hit.any() else None
        if blank is not None and not document_bounds:
            # attention across the row's documents: its other pieces close up and the blanks go to its end, where
            # no token attends them (with document bounds each piece is a segment of its own: it stays in place)
            tokens = np.concatenate([tokens[~blank], tokens[blank]])
            blank = np.sort(blank)
        r = row_tensors(tokens, starts, document_bounds=document_bounds)
        if document_bounds:
            # each segment's group (train/loss_groups.py: a text document's; -1 for a left-out document's, padding
            # to the routers' balancing per document, as a video pack's padding segment is): segment i is piece i
            n_seg = r["cu_seqlens"].numel() - 1
            groups = torch.full((n_seg,), DOC_KINDS.index("text"), dtype=torch.int64)
            if blank is not None:
                groups[torch.from_numpy(hit[:n_seg])] = -1
            r["doc_groups"] = groups
        if blank is None:
            return r, docs, []
        # no loss on a blanked token, nor on the label before it (a blanked token)
        r["loss_mask"][torch.from_numpy(blank[:-1] | blank[1:])] = 0.0
        return r, docs, [d for d, h in zip(docs, hit) if h]


class Blend:
    """Which source each global sample comes from, and its index there (the module docstring's Weyl sequence)."""

    def __init__(self, weights: list[float]):
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        self.n = len(w)
        self.thresholds = np.minimum(np.round(np.cumsum(w) * 2**32), 2**32).astype(np.uint64)
        self.thresholds[-1] = 2**32
        self._counts = [np.zeros(self.n, dtype=np.int64)]   # counts before sample q * BLEND_CHECKPOINT

    def sources(self, start: int, count: int) -> np.ndarray:
        i = np.arange(start + 1, start + count + 1, dtype=np.uint64)
        u = (i * np.uint64(GOLDEN)) & np.uint64(0xFFFFFFFF)
        return np.searchsorted(self.thresholds, u, side="right").astype(np.int64)

    def _counts_at(self, q: int) -> np.ndarray:
        """Samples of each source before sample q * BLEND_CHECKPOINT."""
        while len(self._counts) <= q:
            c = len(self._counts) - 1
            self._counts.append(self._counts[c] + np.bincount(self.sources(c * BLEND_CHECKPOINT, BLEND_CHECKPOINT),
                                                              minlength=self.n))
        return self._counts[q]

    def counts_before(self, n: int) -> np.ndarray:
        """Samples of each source among samples 0 .. n - 1."""
        q = n // BLEND_CHECKPOINT
        return self._counts_at(q) + np.bincount(self.sources(q * BLEND_CHECKPOINT, n - q * BLEND_CHECKPOINT),
                                                minlength=self.n)

    def locate(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within the source) of global samples start .. start + count - 1."""
        q = start // BLEND_CHECKPOINT
        first = q * BLEND_CHECKPOINT
        src = self.sources(first, start - first + count)
        before = self._counts_at(q).copy()
        local = np.empty(len(src), dtype=np.int64)
        for s in range(self.n):   # the running count of each source over the window
            hit = src == s
            local[hit] = before[s] + np.arange(int(hit.sum()))
        return src[start - first:], local[start - first:]


class TokenCorpus:
    """The sources of `data.tokens` and their blend: `sample(i)` for a global sample index."""

    def __init__(self, paths: str, *, weights: list | None = None, seq_length: int, seed: int, shuffle: bool = True,
                 vocab_size: int | None = None, field_name: str = "data.tokens.paths",
                 index_dir: str | os.PathLike | None = None, exclude: ExcludeList | None = None):
        """exclude: the documents data.exclude names, left out of the rows (leave_out); `unmatched` lists what it
        names that no source holds."""
        groups = resolve_prefixes(paths, field_name=field_name)
        # what global sample i is (check_record): the files by name and size, in their places, and the settings
        # (a blend's: its weights from each global sample on where they changed in the run, `continue_blend`)
        self.record = {"files": [[[os.path.basename(p), *(os.path.getsize(p + x) for x in (".idx", ".bin"))]
                                  for p in g] for g in groups],
                       "weights": [float(w) for w in weights] if weights else None,
                       "seq_length": seq_length, "seed": seed, "shuffle": shuffle}
        common = dict(seq_length=seq_length, seed=seed, shuffle=shuffle, vocab_size=vocab_size, index_dir=index_dir)
        if weights:
            kept = [(i, g, float(w)) for i, (g, w) in enumerate(zip(groups, weights)) if float(w) > 0]
            self.sources = [TokenSource(g, source_id=i, **common) for i, g, _ in kept]  # a source's seed: its place in paths
            self.blend = Blend([w for _, _, w in kept]) if len(kept) > 1 else None
            self.kept = [i for i, _, _ in kept]
        else:
            self.sources = [TokenSource([p for g in groups for p in g], source_id=0, **common)]
            self.blend = None
        # the blend's segments: from global sample starts[k] on, blends[k] from each source's offsets[k]-th sample
        self.starts, self.blends, self.offsets = [0], [self.blend], [np.zeros(len(self.sources), dtype=np.int64)]
        if self.blend is not None:
            self.record["blend"] = [[0, self.record["weights"]]]
        self.unmatched = self.leave_out(exclude) if exclude else []

    def continue_blend(self, history: list, position: int) -> None:
        """Takes the blend's `history` ([global sample, weights] from which each weights applied, as a saved record
        holds it) up to `position`, the samples consumed, and this corpus's weights from there when they differ: each
        source continues where it stopped, none of its samples repeated or skipped, and the new weights give the
        shares from `position` on (a Weyl sequence of their own from there)."""
        now = self.record["weights"]
        history = [[int(p), [float(w) for w in ws]] for p, ws in history if int(p) < position or ws == now]
        if not history or history[-1][1] != now:
            history.append([position, now])
        self.starts, self.blends = [p for p, _ in history], [Blend([ws[i] for i in self.kept]) for _, ws in history]
        self.offsets = [np.zeros(len(self.sources), dtype=np.int64)]
        for k in range(1, len(history)):
            span = self.starts[k] - self.starts[k - 1]
            self.offsets.append(self.offsets[-1] + self.blends[k - 1].counts_before(span))
        self.record = {**self.record, "blend": history}

    def resume(self, saved: dict, position: int) -> None:
        """Continues after `position` global samples of a corpus whose `record` was `saved`: DataStateMismatch naming
        each setting that moved its samples (files added to or removed from data.tokens.paths, or grown,
        train.seq_length, data.seed, data.tokens.shuffle, a source's weight set to or from 0); a file's directory may
        change, and a blend's weights too (continue_blend: each source goes on where it stopped)."""
        settings = {"files": "data.tokens.paths", "weights": "data.tokens.weights", "seq_length": "train.seq_length",
                    "seed": "data.seed", "shuffle": "data.tokens.shuffle"}
        changed = {name: (saved.get(k), self.record[k]) for k, name in settings.items()
                   if saved.get(k) != self.record[k]}
        old, now = changed.get("data.tokens.weights", (None, None))
        # weights added or removed (None on one side) change how the paths make sources: no blend continues that
        reweighted = (set(changed) == {"data.tokens.weights"} and old is not None and now is not None
                      and len(old) == len(now) and [w > 0 for w in old] == [w > 0 for w in now])
        if self.blend is not None and (not changed or reweighted):
            self.continue_blend(saved.get("blend") or [[0, saved["weights"]]], position)
            if changed:
                log.warning("data.tokens.weights %s -> %s from global sample %d on: each source continues where it "
                            "stopped", old, now, position)
            return
        if reweighted:   # no blend: one source has weight > 0, the same one before and now, so the same samples
            log.info("data.tokens.weights %s -> %s: one source, %s, takes every sample either way", old, now,
                     ", ".join(self.sources[0].prefixes))
            return
        if not changed:
            return
        files = changed.pop("data.tokens.paths", None)
        what = [f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()]
        if files is not None:
            old, new = ({f[0]: tuple(f[1:]) for g in side or [] for f in g} for side in files)
            moved = ([f"{n} added" for n in sorted(set(new) - set(old))]
                     + [f"{n} removed" for n in sorted(set(old) - set(new))]
                     + [f"{n} changed in size" for n in sorted(set(old) & set(new)) if old[n] != new[n]])
            what.insert(0, "data.tokens.paths: " + (", ".join(moved) or "its files in another order or grouping"))
            changed["data.tokens.paths"] = files
        raise DataStateMismatch(
            f"the token files' global samples differ from those the state was saved with ({'; '.join(what)}): read "
            f"from the saved position, the run would train again on documents it trained on and skip others",
            changed, files is not None, settings="the data.tokens, data.seed and train.seq_length settings")

    def _where(self, start: int, count: int) -> list[tuple[int, int]]:
        """(source, index within the source) of global samples start .. start + count - 1."""
        if self.blend is None:
            return [(0, j) for j in range(start, start + count)]
        out, i, end = [], start, start + count
        for k in range(len(self.starts)):   # each segment of the blend the samples reach
            stop = min(end, self.starts[k + 1]) if k + 1 < len(self.starts) else end
            if i < stop:
                src, local = self.blends[k].locate(i - self.starts[k], stop - i)
                out += zip(src.tolist(), (local + self.offsets[k][src]).tolist())
                i = stop
        return out

    def counts_before(self, i: int) -> list[int]:
        """Each source's samples among global samples 0 .. i - 1 (the index of its next one from global sample i)."""
        if self.blend is None:
            return [int(i)]
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return (self.offsets[k] + self.blends[k].counts_before(int(i) - self.starts[k])).tolist()

    def release_before(self, floor: int, at: int) -> None:
        """Removes the epoch orders' files that no process reads again: those of each source's epochs before the one
        holding its sample at global sample `floor` (below which no rank of the run reads any more), and before the
        epoch before the one this process reads at global sample `at` (TokenSource.release)."""
        for src, f, a in zip(self.sources, self.counts_before(floor), self.counts_before(at)):
            src.release(min(f // src.per_epoch, a // src.per_epoch - 1))

    def samples(self, start: int, count: int) -> list[tuple[int, np.ndarray, list[int]]]:
        """Global samples start .. start + count - 1 as (source, tokens, starts)."""
        return [(s, *self.sources[s].sample(j)[:2]) for s, j in self._where(start, count)]

    def leave_out(self, exclude: ExcludeList) -> list[str]:
        """Leaves the token documents `exclude` names out of every source's rows (TokenSource.leave_out); returns
        what it names that no source holds: documents, and keys that name no document (a video sample's)."""
        missed = set.intersection(*[source.leave_out(exclude) for source in self.sources])
        return sorted(missed | exclude.keys_not_documents())

    def rows(self, start: int, count: int, *, document_bounds: bool) -> list[tuple[dict, list[tuple[str, int]]]]:
        """Global samples start .. start + count - 1 as training rows (TokenSource.row), each with the documents left
        out in it (file prefix, document number)."""
        out = []
        for s, j in self._where(start, count):
            r, _, met = self.sources[s].row(j, document_bounds=document_bounds)
            out.append((r, [self.sources[s].document_name(d) for d in met]))
        return out

    def pieces(self, i: int) -> list[tuple[str, int, int, int, int, bool]]:
        """Global sample i's document pieces in order (TokenSource.pieces): (file prefix, document number in that
        file, first token's offset in the document, tokens in the sample, the document's length, whether data.exclude
        leaves the document out: its tokens are padding in the row, TokenSource.row)."""
        (s, j), = self._where(i, 1)
        source = self.sources[s]
        left_out = set(source.left_out.tolist())
        return [(*source.document_name(d), offset, n, length, d in left_out)
                for d, offset, n, length in source.pieces(j)]

    def documents(self, samples: list[int]) -> list[tuple[str, int]]:
        """The documents whose tokens the global `samples` hold, in the samples' order, each once: (the file prefix,
        the document's number in that file, as megatron's IndexedDataset counts them)."""
        out = {}
        for s, j in (w for i in samples for w in self._where(i, 1)):
            source = self.sources[s]
            for doc in source.sample(j)[2]:
                out.setdefault(source.document_name(doc), None)
        return list(out)


def row_tensors(tokens: np.ndarray, starts: list[int], *, document_bounds: bool) -> dict[str, torch.Tensor]:
    """One sample's training row: tokens / labels / loss_mask / position_ids [S], and with document bounds
    cu_seqlens: positions restart at each document and the label of a document's last position (the next
    document's first token, which nothing before it predicts) has no loss."""
    t = torch.from_numpy(tokens)
    S = t.numel() - 1
    out = {"tokens": t[:-1].clone(), "labels": t[1:].clone(), "loss_mask": torch.ones(S, dtype=torch.float32)}
    if not document_bounds:
        out["position_ids"] = torch.arange(S)
        return out
    for s in starts:   # position s - 1 ends a document: its label is the next one's first token
        if 0 < s <= S:
            out["loss_mask"][s - 1] = 0.0
    bounds = sorted({0, *(s for s in starts if 0 < s < S), S})   # a start at S begins a document of the next row
    cu = torch.tensor(bounds, dtype=torch.int32)
    seg = torch.repeat_interleave(torch.arange(len(bounds) - 1), cu[1:] - cu[:-1])
    out["position_ids"] = torch.arange(S) - cu[:-1].long()[seg]
    out["cu_seqlens"] = cu
    return out


class TokenFileStream(GlobalSamplePosition):
    """Micro-batches of one data-parallel rank from a `TokenCorpus`, in the trainer's token-stream interface (that of
    data/synthetic_tokens.SyntheticTokenStream; the position: data/sample_position.py): tokens / labels /
    position_ids [mbs, S] int64, loss_mask [mbs, S] float32, and with document bounds (micro-batch size 1)
    cu_seqlens [D + 1] int32 and doc_groups [D] int64 (a text document's group, -1 for one data.exclude leaves out:
    TokenSource.row)."""

    kind, what = "tokens", "a token-file stream (data.kind=tokens)"

    def __init__(self, corpus: TokenCorpus, *, document_bounds: bool, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, one_epoch: bool = False):
        """one_epoch (a held-out set scored whole, once): rows after the first epoch's come with a zero loss mask,
        and `padding` records, per micro-batch handed out, whether all its rows are such filler."""
        super().__init__(micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, dp_rank=dp_rank,
                         dp_size=dp_size)
        if document_bounds and micro_batch_size != 1:
            raise ValueError(f"data.tokens.document_bounds=true packs one row per micro-batch: train.micro_batch_size "
                             f"must be 1, got {micro_batch_size} (or data.tokens.document_bounds=false: attention "
                             f"across the documents of a row)")
        if one_epoch and corpus.blend is not None:
            raise ValueError("a blend of token sources (data.tokens.weights) has no one first epoch to score whole")
        self.corpus, self.document_bounds, self.one_epoch = corpus, document_bounds, one_epoch
        self.padding: list[bool] = []
        # the ranks read in lockstep, each its share of a step's global batch, so no rank reads a global sample more
        # than a step behind another's; twice that for margin. Epoch files of the samples below go (release_before)
        self.lag = 2 * global_batch_size
        self._release_at = 0
        self.left_out_met = 0     # pieces of documents data.exclude names that this stream's rows held (blanked)
        self._left_out_logged: set[tuple[str, int]] = set()
        self._wait = 0.0          # seconds spent making micro-batches since the last step_metrics()

    def step_metrics(self) -> dict:
        """Scalars for the training log (those of VideoBatchStream.step_metrics that token rows have): the seconds
        the training loop spent reading this rank's rows since the last call (the trainer calls it once per step;
        the files are read where the loop asks, no worker reads ahead), and once there are any, the pieces of
        documents data.exclude names that its rows held since the run began (a document over two rows counts
        twice)."""
        wait, self._wait = self._wait, 0.0
        out = {"data_wait_s": wait}
        if self.left_out_met:
            out["data_samples_excluded"] = self.left_out_met
        return out

    def counters(self) -> dict:
        return {"left_out_met": self.left_out_met}

    def samples_record(self) -> dict:
        return self.corpus.record

    def resume_samples(self, saved: dict, consumed: int) -> None:
        self.corpus.resume(saved, consumed)

    def load_counters(self, entries: list[dict]) -> None:
        self.left_out_met = sum(int(c.get("left_out_met", 0)) for c in entries)

    def _step_documents(self, micro_batches: list[int] | None, parts: dict[int, list[int]] | None
                        ) -> tuple[dict[int, list[int]] | None, list[tuple[str, int]]]:
        """(the rows `parts` narrows, the documents named) for describe_step and step_record: `parts` names, of some
        micro-batches (by index), the parts whose tokens' loss was not finite alone: with document bounds (one row
        per micro-batch) the row's documents (its segments, in order), else rows."""
        if not (self.document_bounds and parts):
            rows = None if self.document_bounds else parts
            return rows, self.corpus.documents(self.step_samples(micro_batches, rows))
        docs = []
        for i in micro_batches:
            for j in self.step_samples([i]):
                held = self.corpus.documents([j])   # a part past them: a KSA row's padding, naming no document
                docs += [held[d] for d in parts.get(i, []) if d < len(held)] or held
        return None, list(dict.fromkeys(docs))

    def describe_step(self, micro_batches: list[int] | None = None, parts: dict[int, list[int]] | None = None) -> str:
        """The samples this rank drew in the current step (or in those of its micro-batches) and the documents they
        hold (by file prefix and document number; the first SHOWN_DOCUMENTS), for a message about the step; `parts`
        as in _step_documents."""
        rows, docs = self._step_documents(micro_batches, parts)
        by_file: dict[str, list[int]] = {}
        for prefix, n in docs[:SHOWN_DOCUMENTS]:
            by_file.setdefault(prefix, []).append(n)
        shown = "; ".join(f"{prefix}: {', '.join(map(str, ns))}" for prefix, ns in by_file.items())
        more = f"; +{len(docs) - SHOWN_DOCUMENTS} more" if len(docs) > SHOWN_DOCUMENTS else ""
        narrowed = " (those whose tokens' loss was not finite)" if self.document_bounds and parts else ""
        return f"{super().describe_step(micro_batches, rows)}, documents {shown}{more}{narrowed}"

    def step_record(self, micro_batches: list[int] | None = None, parts: dict[int, list[int]] | None = None) -> dict:
        """describe_step's data as fields (train/nonfinite.py's record): its global samples and every document named,
        [file prefix, document number]."""
        rows, docs = self._step_documents(micro_batches, parts)
        return {**super().step_record(micro_batches, rows), "documents": [list(d) for d in docs]}

    @property
    def unmatched_exclusions(self) -> list[str]:
        """What data.exclude names that this stream's files do not hold (TokenCorpus.leave_out)."""
        return self.corpus.unmatched

    @property
    def samples_per_epoch(self) -> int:
        """Rows in an epoch of the (unblended) corpus: the whole set, once."""
        return self.corpus.sources[0].per_epoch

    def __next__(self) -> dict[str, torch.Tensor]:
        began = time.perf_counter()
        try:
            return self._next()
        finally:
            self._wait += time.perf_counter() - began

    def _next(self) -> dict[str, torch.Tensor]:
        start = self.next_start()
        if start >= self._release_at:   # once a step
            self.corpus.release_before(max(0, start - self.lag), start)
            self._release_at = start + self.gbs
        rows = []
        for j, (r, met) in enumerate(self.corpus.rows(start, self.mbs, document_bounds=self.document_bounds), start):
            rows.append(r)
            for prefix, n in met:
                self.left_out_met += 1
                if (prefix, n) not in self._left_out_logged:
                    self._left_out_logged.add((prefix, n))
                    log.info("data.exclude: %s document %d left out of global sample %d (its tokens are padding "
                             "without loss)", prefix, n, j)
        if self.one_epoch:
            end = self.samples_per_epoch
            for j, r in enumerate(rows, start):
                if j >= end:
                    r["loss_mask"].zero_()
            self.padding.append(start >= end)
        if self.document_bounds:
            r = rows[0]
            return {"tokens": r["tokens"][None], "labels": r["labels"][None], "loss_mask": r["loss_mask"][None],
                    "position_ids": r["position_ids"][None], "cu_seqlens": r["cu_seqlens"],
                    "doc_groups": r["doc_groups"]}
        return {k: torch.stack([r[k] for r in rows]) for k in ("tokens", "labels", "loss_mask", "position_ids")}


# ---- token files in the packed video loader's mixture ---------------------------------------------------------

class _TokenEpoch:
    """What the packed loader reads of a planner's epoch (loader.EpochPlan), for a token source: nothing rejected,
    continued or cut, and `packs[j]` without catalog items."""
    rejects: dict = {}
    pieces: dict = {}
    truncated: dict = {}

    def __init__(self, n: int):
        self.packs = _NoItems(n)


class _NoItems:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> list:
        return []


class TokenPacks:
    """Token files as one source of the packed video loader's mixture (`data.video.text_tokens`): pack j of epoch e
    is row j of the source's epoch e (TokenSource), as a `PackedSample` of text alone: `seq_len` tokens, labels the
    next tokens (none across a document boundary), positions restarting at each document (all three M-RoPE rows
    equal, as for text), `cu_seqlens` at the documents, no frames. It stands where the loader has a `Planner`
    (`num_packs`, `epoch`, `catalog`, `cfg`, `tokenizer`)."""

    catalog: tuple = ()

    def __init__(self, spec: str, cfg, tokenizer, seed: int):
        self.cfg, self.tokenizer = cfg, tokenizer
        prefixes = self.check_tokenizer(spec, tokenizer)
        self.source = TokenSource(prefixes, seq_length=cfg.seq_len, seed=seed, source_id=0,
                                  vocab_size=tokenizer.vocab_size, index_dir=cfg.text_tokens_index_dir or None)
        # a document's key in the packs: "<file>#<n>", the file by its base name, or by as much of its path as tells
        # it from another file of that base name (data/video/shards.unique_tails; data.exclude reads either)
        self.names = unique_tails(prefixes)
        # what the loader's state fingerprint holds of this source (as loader.Planner.fingerprint of a catalog): the
        # files by base name, their sizes and the row length
        blob = json.dumps({"prefixes": [os.path.basename(p) for p in prefixes], "documents": self.source.documents,
                           "tokens": self.source.tokens, "seq_len": cfg.seq_len})
        self.fingerprint = hashlib.sha1(blob.encode()).hexdigest()[:16]

    def summary(self) -> str:
        """What the loader's mixture line says of this source."""
        return f"{self.source.documents} documents, {self.source.tokens} tokens in token files"

    @staticmethod
    def check_tokenizer(spec: str, tokenizer) -> list[str]:
        """The prefixes `spec` names, each tokenized with `tokenizer` as far as its sidecar says (the same vocabulary
        size and <eos>: the files' ids must mean what the video documents' ids mean); ValueError naming the file."""
        prefixes = [p for g in resolve_prefixes(spec, field_name="data.video.text_tokens") for p in g]
        for prefix in prefixes:
            meta = sidecar(prefix)
            if meta is not None and (meta["vocab_size"] != tokenizer.vocab_size or
                                     meta.get("eos_id") not in (None, tokenizer.eos_id)):
                raise ValueError(f"data.video.text_tokens: {prefix} was tokenized with {meta.get('tokenizer')} (vocab_size "
                                 f"{meta['vocab_size']}, eos {meta.get('eos_id')}), the video documents with "
                                 f"{tokenizer!r} (vocab_size {tokenizer.vocab_size}, eos {tokenizer.eos_id}): "
                                 f"tokenize them with data.video.tokenizer")
        return prefixes

    def num_packs(self, e: int) -> int:
        return self.source.per_epoch

    @property
    def on_disk(self) -> bool:
        """As loader.Planner.on_disk: whether the epoch orders are files in index_dir."""
        return self.source.index_dir is not None and not self.source.index_note

    def release(self, keep_from: int) -> None:
        """As loader.Planner.release: the files of the epochs before `keep_from` go."""
        self.source.release(keep_from)

    def epoch(self, e: int) -> _TokenEpoch:
        return _TokenEpoch(self.source.per_epoch)

    def build(self, epoch: int, index: int):
        from data.video.packing import PackedSample

        r, docs, met = self.source.row(epoch * self.source.per_epoch + index, document_bounds=True)
        S = int(r["tokens"].numel())
        labels = r["labels"].clone()
        labels[r["loss_mask"] == 0] = self.cfg.label_ignore_index
        f = np.searchsorted(self.source.base, np.asarray(docs), side="right") - 1
        keys = [f"{self.names[int(i)]}#{d - int(self.source.base[int(i)])}" for i, d in zip(f, docs)]
        n = int(r["cu_seqlens"].numel()) - 1
        p2 = 3 * self.cfg.patch_size ** 2
        return PackedSample(
            tokens=r["tokens"], labels=labels, loss_mask=r["loss_mask"],
            position_ids=r["position_ids"][None].expand(3, S).contiguous(), cu_seqlens=r["cu_seqlens"],
            pixel_values=torch.zeros(0, p2, dtype=torch.uint8), grid_thw=torch.zeros(0, 3, dtype=torch.int64),
            visual_pos=torch.zeros(0, dtype=torch.int64), frame_timestamps=torch.zeros(0, dtype=torch.float32),
            frame_doc=torch.zeros(0, dtype=torch.int32), num_docs=n, num_pad=0, text_docs=n,
            doc_kinds=["text"] * n,
            sample_keys=keys[:n], epoch=epoch, pack_index=index, planned_keys=keys[:n],
            excluded=list(dict.fromkeys(k for k, d in zip(keys[:n], docs) if d in met)))
