"""Token files (data.kind=tokens, data/token_files.py): pre-tokenized text in megatron's indexed datasets.

References: the tokenizer itself and `json` on the same lines (what tokenize_jsonl writes), megatron-core's
IndexedDataset reading the files back, plain concatenation and slicing of the documents (the samples), a
sequential loop over the Weyl rule (the blend), and a loop over each row's positions (document bounds).
"""
import json
import os
import signal
import threading

import numpy as np
import pytest
import torch

from data.token_files import (BLEND_CHECKPOINT, Blend, TokenCorpus, TokenFilesConfig, TokenFileStream, TokenSource,
                              resolve_prefixes, row_tensors, sidecar, synthetic_documents, tokenize_jsonl,
                              write_token_files)
from data.video.tokenizer import ByteTokenizer, HFTokenizer

from .conftest import is_mapped

TOK = ByteTokenizer()


def _docs(n, seed, lo=1, hi=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 300, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two datasets of random documents (1 to 39 tokens, some shorter than anything, some over a row)."""
    d = tmp_path_factory.mktemp("tok")
    a, b = _docs(57, 1), _docs(31, 2, 1, 90)
    write_token_files(a, d / "a", vocab_size=512)
    write_token_files(b, d / "b", vocab_size=512)
    return d, a, b


def test_tokenize_jsonl_writes_each_line_and_lists_the_bad_ones(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    lines = ['{"text": "first document"}', '{"text": ""}', 'not json', '[1, 2]', '{"body": "x"}',
             '{"text": 5}', '', '{"text": "ünïcode 猫", "meta": 1}', '{"text": "last"}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "in2.jsonl").write_bytes(b'{"text": "other file"}\n{"text": "bad \xff byte"}\n{"text": "after it"}\n')
    info = tokenize_jsonl([str(tmp_path / "in.jsonl"), str(tmp_path / "in2.jsonl")], tmp_path / "out", TOK, batch=2)
    good = [json.loads(x)["text"] for x in ('{"text": "first document"}', '{"text": "ünïcode 猫", "meta": 1}',
                                            '{"text": "last"}', '{"text": "other file"}', '{"text": "after it"}')]
    ds = IndexedDataset(str(tmp_path / "out"))
    assert len(ds) == 5 and [ds[i].tolist() for i in range(5)] == [TOK.encode(t) + [TOK.eos_id] for t in good]
    skipped = [json.loads(x) for x in (tmp_path / "out.skipped.jsonl").read_text().splitlines()]
    assert [(s["file"].endswith("in.jsonl"), s["line"]) for s in skipped] == [(True, 2), (True, 3), (True, 4), (True, 5),
                                                                              (True, 6), (False, 2)]
    assert [s["reason"].split(" (")[0] for s in skipped] == ["'text' is empty", "not JSON", "not a JSON object",
                                                            "no 'text' field", "'text' is a int, not a string",
                                                            "not UTF-8"]
    meta = sidecar(str(tmp_path / "out"))
    assert meta == info and meta["documents"] == 5 and meta["skipped_lines"] == 6 and meta["dtype"] == "uint16"
    assert meta["tokens"] == sum(len(TOK.encode(t)) + 1 for t in good)
    assert not list(tmp_path.glob("*.partial"))
    # over worker processes, in chunks that end mid-file and mid-bad-lines: the same files byte for byte
    again = tokenize_jsonl([str(tmp_path / "in.jsonl"), str(tmp_path / "in2.jsonl")], tmp_path / "par", TOK, batch=2,
                           workers=3)
    assert again == info
    for suffix in (".bin", ".idx", ".skipped.jsonl"):
        assert (tmp_path / f"par{suffix}").read_bytes() == (tmp_path / f"out{suffix}").read_bytes(), suffix


def test_a_text_holding_an_unpaired_surrogate_is_a_line_left_out(tmp_path):
    """A JSON escape of half a UTF-16 pair ("\\ud800", as cut web text holds) reads as a str that no tokenizer can
    encode: the whole run stopped with a UnicodeEncodeError (the byte tokenizer) or a TypeError (a Hugging Face one)
    naming no line. The line is left out and listed, as a line that is not UTF-8 is; the others are written."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data.video.synthetic import make_synthetic_hf_tokenizer

    (tmp_path / "in.jsonl").write_text('{"text": "good"}\n{"text": "bad \\ud800 half"}\n{"text": "after"}\n')
    for name, tok in (("bytes", TOK), ("hf", HFTokenizer(make_synthetic_hf_tokenizer(tmp_path / "hf")))):
        for workers in (1, 2):
            out = tmp_path / f"{name}{workers}"
            info = tokenize_jsonl([str(tmp_path / "in.jsonl")], out, tok, workers=workers)
            ds = IndexedDataset(str(out))
            assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eos_id] for t in ("good", "after")]
            skipped = [json.loads(x) for x in (tmp_path / f"{name}{workers}.skipped.jsonl").read_text().splitlines()]
            assert info["skipped_lines"] == 1 and [s["line"] for s in skipped] == [2]
            assert skipped[0]["reason"].startswith("'text' holds an unpaired surrogate '\\ud800' at character 4")


def test_a_byte_order_mark_opening_a_jsonl_file_is_no_text(tmp_path):
    """A UTF-8 byte order mark before line 1 (Windows tools write one) made the line 'not JSON' and left it out; it
    is read as utf-8-sig reads it, in .jsonl and .jsonl.gz. Reference: `json` on the lines decoded as utf-8-sig, and
    IndexedDataset reading the files back."""
    import gzip

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    body = '{"text": "first"}\n{"text": "second"}\n'.encode()
    data = b"\xef\xbb\xbf" + body
    (tmp_path / "bom.jsonl").write_bytes(data)
    (tmp_path / "bom.jsonl.gz").write_bytes(gzip.compress(data))
    inputs = [str(tmp_path / "bom.jsonl"), str(tmp_path / "bom.jsonl.gz")]
    ref = [json.loads(x)["text"] for x in data.decode("utf-8-sig").splitlines()] * 2
    for workers in (1, 2):
        info = tokenize_jsonl(inputs, tmp_path / f"out{workers}", TOK, batch=1, workers=workers)
        ds = IndexedDataset(str(tmp_path / f"out{workers}"))
        assert info["skipped_lines"] == 0 and [ds[i].tolist() for i in range(len(ds))] == [
            TOK.encode(t) + [TOK.eos_id] for t in ref]


def test_a_line_nested_too_deeply_is_a_line_left_out(tmp_path):
    """One line of arrays nested 200,000 deep (json.loads: RecursionError) stopped the whole tokenization; it is a
    line left out and listed, the others written. Reference: the good lines themselves and IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    deep = '{"text": "x", "a": ' + "[" * 200000 + "]" * 200000 + "}"
    (tmp_path / "in.jsonl").write_text('{"text": "good"}\n' + deep + '\n{"text": "after"}\n')
    for workers in (1, 2):
        info = tokenize_jsonl([str(tmp_path / "in.jsonl")], tmp_path / f"out{workers}", TOK, workers=workers)
        ds = IndexedDataset(str(tmp_path / f"out{workers}"))
        assert [ds[i].tolist() for i in range(len(ds))] == [TOK.encode(t) + [TOK.eos_id] for t in ("good", "after")]
        skipped = [json.loads(x) for x in (tmp_path / f"out{workers}.skipped.jsonl").read_text().splitlines()]
        assert info["skipped_lines"] == 1 and skipped == [{"file": str(tmp_path / "in.jsonl"), "line": 2,
                                                           "reason": "not JSON (nested too deeply)"}]


_LOCK = threading.Lock()   # held by the test's process while the workers tokenize (LockingTokenizer)


class LockingTokenizer(ByteTokenizer):
    """Takes _LOCK for each text, as a library's tokenizer takes its own locks: a worker that inherited the lock held
    (forked from the test's process, which holds it) would wait on it forever."""

    def encode(self, text):
        with _LOCK:
            return super().encode(text)


class DyingTokenizer(ByteTokenizer):
    """Ends its process (as the kernel's OOM killer would) on the text 'die', in a worker process only."""

    def __init__(self, parent: int):
        super().__init__()
        self.parent = parent

    def encode(self, text):
        if text == "die" and os.getpid() != self.parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode(text)


@pytest.mark.timeout(180)
def test_tokenize_jsonl_workers_do_not_inherit_this_process_s_locks(tmp_path):
    """The workers are not forked from the calling process: a lock it holds (another thread's, at the moment of a
    fork) is not held in them. Under multiprocessing.Pool with fork this waited forever. Reference: one process."""
    lines = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(40))
    (tmp_path / "in.jsonl").write_text(lines)
    one = tokenize_jsonl([str(tmp_path / "in.jsonl")], tmp_path / "one", TOK, batch=3)
    with _LOCK:
        two = tokenize_jsonl([str(tmp_path / "in.jsonl")], tmp_path / "two", LockingTokenizer(), batch=3, workers=2)
    assert {**two, "tokenizer": None} == {**one, "tokenizer": None} and one["documents"] == 40
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()


@pytest.mark.timeout(180)
def test_a_tokenize_worker_that_dies_is_an_error_and_leaves_no_files(tmp_path):
    """A worker killed mid-chunk: TokenizeWorkerDied saying so, and no output or partial file (multiprocessing.Pool
    waited forever for the chunk)."""
    from data.token_files import TokenizeWorkerDied

    texts = [f"document {i}" for i in range(30)] + ["die"] + [f"after {i}" for i in range(30)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with pytest.raises(TokenizeWorkerDied, match="ended while tokenizing.*fewer --workers"):
        tokenize_jsonl([str(tmp_path / "in.jsonl")], tmp_path / "out", DyingTokenizer(os.getpid()), batch=4, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def _session(sid: int) -> dict[int, str]:
    """The live processes of session `sid` (/proc; zombies left out): pid -> command line."""
    out = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()   # after the command's name: state, ppid, pgrp, session
            if int(fields[3]) == sid and fields[0] != "Z":
                with open(f"/proc/{d}/cmdline") as f:
                    out[int(d)] = f.read().replace("\0", " ")
        except (OSError, ValueError, IndexError):   # ended meanwhile
            pass
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_tokenize_workers_end_with_a_killed_caller(tmp_path, sig):
    """tokenize_text killed (SIGKILL, or SIGTERM: no pool shutdown runs) left its workers, children of the fork server,
    blocked on their queues' pipes forever, and with them the fork server and its resource tracker. Each worker now
    watches the caller and ends with it, and the fork server with them. Reference: the processes of the caller's
    session, from /proc. The caller reads its input from a pipe held open, so its workers are waiting when it dies."""
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    script = (f"import sys; sys.path.insert(0, {repo!r})\n"
              f"from data.token_files import tokenize_jsonl\nfrom data.video.tokenizer import ByteTokenizer\n"
              f"tokenize_jsonl([{str(fifo)!r}], {str(tmp_path / 'out')!r}, ByteTokenizer(), batch=1, workers=2)\n")
    caller = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    left = {}
    try:
        with open(fifo, "w") as w:       # the caller blocks reading more lines: its workers idle on their queue
            w.write("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(8)))
            w.flush()
            deadline = time.time() + 120
            while sum("multiprocessing.forkserver" in c for c in _session(caller.pid).values()) < 3:  # server + 2
                assert time.time() < deadline and caller.poll() is None, _session(caller.pid)
                time.sleep(0.2)
            caller.send_signal(sig)
            caller.wait(30)
            deadline = time.time() + 15
            while (left := _session(caller.pid)) and time.time() < deadline:
                time.sleep(0.2)
        assert not left, f"left running after the caller ended: {left}"
    finally:
        for pid in _session(caller.pid):     # what this test started, if a worker stayed
            os.kill(pid, signal.SIGKILL)
        if caller.poll() is None:
            caller.kill()


def test_tokenize_jsonl_over_workers_keeps_the_order(tmp_path):
    """A Hugging Face tokenizer in worker processes, many chunks in flight: the documents in the lines' order, as one
    process writes them."""
    import gzip

    from data.video.synthetic import make_synthetic_hf_tokenizer

    tok = HFTokenizer(make_synthetic_hf_tokenizer(tmp_path / "hf"))
    texts = list(synthetic_documents(300, 3))
    texts[200] += " <|endoftext|> <|im_end|>"       # read as text in a worker process too
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[:170])
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[170:]))
    inputs = [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.jsonl")]
    one = tokenize_jsonl(inputs, tmp_path / "one", tok, batch=7)
    two = tokenize_jsonl(inputs, tmp_path / "two", tok, batch=7, workers=2)
    assert one == two and one["documents"] == 300
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes(), suffix
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(str(tmp_path / "two"))
    assert [ds[i].tolist() for i in (0, 169, 170, 299)] == [tok.encode(texts[i]) + [tok.eos_id]
                                                             for i in (0, 169, 170, 299)]
    assert int((ds[200] == tok.eos_id).sum()) == 1


def test_a_line_spelling_special_tokens_is_text_with_eos_only_at_its_end(tmp_path):
    """Web text spells special tokens ("<|endoftext|>" on a page about GPT-2, Qwen's chat tokens): the Hugging Face
    tokenizer wrote them as the tokens, an <eos> in the middle of a document (and a turn's end) that the model then
    trained on. The document's ids equal transformers' tokenizer with split_special_tokens=True, <eos> after it alone,
    and the sidecar says how such text was read."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import PreTrainedTokenizerFast

    from data.video.synthetic import make_synthetic_hf_tokenizer

    tok = HFTokenizer(make_synthetic_hf_tokenizer(tmp_path / "hf"))
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"), split_special_tokens=True)
    texts = ["GPT-2 ends documents with <|endoftext|>; Qwen's chats use <|im_start|>user and <|im_end|>.",
             "Frames: <|vision_start|><|video_pad|><|vision_end|>", "plain"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    info = tokenize_jsonl([str(tmp_path / "in.jsonl")], tmp_path / "out", tok)
    ds = IndexedDataset(str(tmp_path / "out"))
    assert [ds[i].tolist() for i in range(3)] == [ref.encode(t, add_special_tokens=False) + [tok.eos_id]
                                                  for t in texts]
    assert int((ds[0] == tok.eos_id).sum()) == 1 and info["specials_in_text"] == "text"


def test_token_files_written_when_special_tokens_were_read_as_ids_are_named_at_launch(tmp_path):
    """Token files that launch/tokenize_text.py wrote with a Hugging Face tokenizer before a line's special tokens were
    read as text hold "<|endoftext|>"'s id inside a document that spelled it; their sidecar lacks specials_in_text.
    The launch read them without a word; it now warns, naming the files and what to do (they are still read). Files
    written now, and the byte tokenizer's (which never read special tokens in text), pass silently."""
    import warnings
    from types import SimpleNamespace

    from data.video.synthetic import make_synthetic_hf_tokenizer
    from train.launch import check_token_paths

    tok = HFTokenizer(make_synthetic_hf_tokenizer(tmp_path / "hf"))
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "GPT-2 ends documents with <|endoftext|>. " * 8}) + "\n")
    for name, t in (("new", tok), ("old", tok), ("bytes", ByteTokenizer())):
        tokenize_jsonl([str(tmp_path / "in.jsonl")], tmp_path / name, t)
    meta = json.loads((tmp_path / "old.json").read_text())
    del meta["specials_in_text"]                     # as the sidecar was written before the field
    (tmp_path / "old.json").write_text(json.dumps(meta))

    def launch_warnings(paths: str) -> list[str]:
        cfg = SimpleNamespace(model=SimpleNamespace(lm=SimpleNamespace(vocab_size=1024)), train=SimpleNamespace(
            seq_length=8), data=SimpleNamespace(tokens=SimpleNamespace(paths=paths, eval_paths="", weights=None)))
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            check_token_paths(cfg)
        return [str(w.message) for w in got]

    assert launch_warnings(f"{tmp_path / 'new'},{tmp_path / 'bytes'}") == []
    got = launch_warnings(f"{tmp_path / 'new'},{tmp_path / 'old'}")
    assert len(got) == 1 and got[0].startswith(f"data.tokens.paths: 1 token file(s) ({tmp_path / 'old'}) were "
                                               f"written by launch/tokenize_text.py with a Hugging Face tokenizer")
    assert "write them again with launch/tokenize_text.py" in got[0]


def test_hf_tokenizer_batches_as_it_encodes(tmp_path):
    from data.video.synthetic import make_synthetic_hf_tokenizer

    tok = HFTokenizer(make_synthetic_hf_tokenizer(tmp_path / "hf"))
    texts = list(synthetic_documents(20, 0)) + ["猫 — ünïcode"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def _concat(docs, order):
    return np.concatenate([np.asarray(docs[i], dtype=np.int64) for i in order])


def test_samples_are_slices_of_the_concatenated_documents(files):
    d, a, b = files
    S = 16
    src = TokenSource([str(d / "a"), str(d / "b")], seq_length=S, seed=5, source_id=0, shuffle=False)
    docs = a + b
    flat = _concat(docs, range(len(docs)))
    assert src.tokens == flat.size and src.per_epoch == (flat.size - 1) // S
    bounds = set(np.cumsum([0] + [len(x) for x in docs]).tolist())
    for e in range(2):
        for k in range(src.per_epoch):
            tokens, starts, _ = src.sample(e * src.per_epoch + k)
            assert tokens.tolist() == flat[k * S:(k + 1) * S + 1].tolist()
            assert starts == [p - k * S for p in range(k * S, (k + 1) * S + 1) if p in bounds]


def test_shuffled_epochs_cover_every_document_once(files):
    d, a, b = files
    S = 16
    src = TokenSource([str(d / "a"), str(d / "b")], seq_length=S, seed=5, source_id=0)
    docs = a + b
    seen = []
    for e in range(3):
        order, _, samples = src._epoch(e)
        assert sorted(order.tolist()) == list(range(len(docs))) and sorted(samples.tolist()) == list(range(src.per_epoch))
        flat = _concat(docs, order)   # the epoch's concatenation, cut as above, taken in the sample permutation
        got = [src.sample(e * src.per_epoch + k) for k in range(src.per_epoch)]
        for (tokens, _, _), k in zip(got, samples):
            assert tokens.tolist() == flat[k * S:k * S + S + 1].tolist()
        covered = sorted({doc for _, _, pieces in got for doc in pieces})
        tail = (flat.size - 1) % S   # the epoch's tail shorter than a sample is dropped: the last few documents
        assert len(covered) >= len(docs) - tail, (len(covered), tail)
        seen.append(order.tolist())
    assert seen[0] != seen[1] != seen[2]
    again = TokenSource([str(d / "a"), str(d / "b")], seq_length=S, seed=5, source_id=0)
    assert all(again.sample(j)[0].tolist() == src.sample(j)[0].tolist() for j in (0, 7, 60, 200))
    other = TokenSource([str(d / "a"), str(d / "b")], seq_length=S, seed=6, source_id=0)
    assert other._epoch(0)[0].tolist() != seen[0]


def _rows(src, js):
    return [src.sample(j)[0].tolist() for j in js]


def test_epoch_orders_kept_on_disk_are_the_ones_built_in_memory(files, tmp_path, monkeypatch):
    d, a, b = files
    prefixes, S = [str(d / "a"), str(d / "b")], 16
    ref = TokenSource(prefixes, seq_length=S, seed=5, source_id=0)   # held in memory: the reference
    js = list(range(3 * ref.per_epoch))
    want = _rows(ref, js)
    disk = TokenSource(prefixes, seq_length=S, seed=5, source_id=0, index_dir=tmp_path)
    assert _rows(disk, js) == want
    (key,) = [p.name for p in tmp_path.iterdir()]
    # reading removes nothing (another rank may still read an earlier epoch); once every rank is past epoch 0 (the
    # stream knows: TokenCorpus.release_before), its files go
    def kept():
        return sorted(p.name for p in (tmp_path / key).glob("*.npy"))
    assert kept() == sorted(f"epoch{e}.{part}.npy" for e in (0, 1, 2) for part in ("order", "ends", "rows"))
    disk.release(1)
    assert kept() == sorted(f"epoch{e}.{part}.npy" for e in (1, 2) for part in ("order", "ends", "rows"))
    assert not list((tmp_path / key).glob("*.tmp"))
    # another process of the node (a rank, a loader worker) maps them and builds nothing
    monkeypatch.setattr(TokenSource, "_build", lambda self, e: pytest.fail(f"epoch {e} rebuilt"))
    again = TokenSource(prefixes, seq_length=S, seed=5, source_id=0, index_dir=tmp_path)
    n = ref.per_epoch
    assert _rows(again, js[:n - 1:-1]) == want[:n - 1:-1]          # epochs 2 and 1, backwards
    assert all(is_mapped(x) for x in again._epoch(2))
    monkeypatch.undo()
    assert _rows(again, js[:n]) == want[:n]                         # epoch 0 again: rebuilt, the same rows
    # what the orders are a function of names their directory: another seed, row length or file gets its own
    for kw in ({"seed": 6}, {"seq_length": 17}, {"shuffle": False}):
        args = {"seq_length": S, "seed": 5, "shuffle": True} | kw
        TokenSource(prefixes, source_id=0, index_dir=tmp_path, **args).sample(0)
    b2 = tmp_path.parent / f"{tmp_path.name}_b2"
    b2.mkdir()
    write_token_files(b[:-1], b2 / "b", vocab_size=512)
    TokenSource([prefixes[0], str(b2 / "b")], seq_length=S, seed=5, source_id=0, index_dir=tmp_path).sample(0)
    assert len(list(tmp_path.iterdir())) == 5


def test_torn_or_unwritable_epoch_orders_are_rebuilt_or_held_in_memory(files, tmp_path, caplog):
    d, _, _ = files
    prefixes, S = [str(d / "a"), str(d / "b")], 16
    ref = TokenSource(prefixes, seq_length=S, seed=5, source_id=0)
    js = list(range(2 * ref.per_epoch))
    TokenSource(prefixes, seq_length=S, seed=5, source_id=0, index_dir=tmp_path).sample(0)
    (key,) = tmp_path.iterdir()
    rows = key / "epoch0.rows.npy"
    for damage in (rows.read_bytes()[:-8], b"not an array", np.arange(3, dtype=np.int64)):
        if isinstance(damage, bytes):
            rows.write_bytes(damage)          # a torn or foreign file
        else:
            np.save(rows, damage)             # a whole array of the wrong length
        src = TokenSource(prefixes, seq_length=S, seed=5, source_id=0, index_dir=tmp_path)
        assert _rows(src, js) == _rows(ref, js) and src.index_note == ""
        assert np.load(rows).shape == (ref.per_epoch,)   # and written again whole
    blocker = tmp_path / "a_file"
    blocker.write_text("x")                   # the directory cannot be made: held in memory, said once
    with caplog.at_level("WARNING", logger="data.token_files"):
        src = TokenSource(prefixes, seq_length=S, seed=5, source_id=0, index_dir=blocker / "index")
        assert _rows(src, js) == _rows(ref, js)
    assert "a_file" in src.index_note and len([r for r in caplog.records if "epoch orders" in r.message]) == 1


def _read_rows_in_a_process(prefixes, index_dir, js, out, build_log):
    import os as _os
    import time

    from data import token_files

    build = token_files.TokenSource._build

    def logged(self, e):
        with open(build_log, "a") as f:
            f.write(f"{_os.getpid()} {e}\n")
        time.sleep(0.5)   # a build long enough that the other processes ask for the epoch while it runs
        return build(self, e)

    token_files.TokenSource._build = logged
    src = token_files.TokenSource(prefixes, seq_length=16, seed=5, source_id=0, index_dir=index_dir)
    np.save(out, np.stack([src.sample(j)[0] for j in js]))


def test_processes_of_a_node_build_each_epoch_once(files, tmp_path):
    import multiprocessing as mp

    d, _, _ = files
    prefixes = [str(d / "a"), str(d / "b")]
    ref = TokenSource(prefixes, seq_length=16, seed=5, source_id=0)
    js = list(range(2 * ref.per_epoch))
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_read_rows_in_a_process, args=(prefixes, tmp_path / "index", js,
                                                               tmp_path / f"rows{i}.npy", tmp_path / "builds"))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    want = np.stack([ref.sample(j)[0] for j in js])
    assert all(np.array_equal(np.load(tmp_path / f"rows{i}.npy"), want) for i in range(3))
    built = [line.split()[1] for line in (tmp_path / "builds").read_text().splitlines()]
    assert sorted(built) == ["0", "1"]        # one process built each epoch; the others waited and mapped it


def test_a_step_names_the_documents_whose_loss_was_not_finite(tmp_path):
    """describe_step(micro_batches, parts): of a micro-batch, its parts whose tokens' loss was not finite alone (as
    train/nonfinite.py part_ids counts them): with document bounds the row's documents (its segments), else its rows.
    Reference: the ids of the tokens in those segments, or rows."""
    ids = _documents_named_by_their_ids(tmp_path)
    corpus = TokenCorpus(str(tmp_path), seq_length=16, seed=3)
    s = TokenFileStream(corpus, document_bounds=True, micro_batch_size=1, global_batch_size=4, dp_rank=0, dp_size=1)
    rows = [next(s) for _ in range(4)]
    segments = [[ids[t] for t in dict.fromkeys(r["tokens"][0, a:b].tolist())]
                for r in rows for a, b in zip(r["cu_seqlens"][:-1].tolist(), r["cu_seqlens"][1:].tolist())]
    row = [len(r["cu_seqlens"]) - 1 for r in rows]
    assert all(len(seg) == 1 for seg in segments) and max(row) >= 2   # a segment is one document
    i = max(range(4), key=row.__getitem__)        # a micro-batch of several documents: its first and last
    first = sum(row[:i])
    named = [segments[first][0], segments[first + row[i] - 1][0]]
    assert s.describe_step([i], {i: [0, row[i] - 1]}) == (
        f"a token-file stream (data.kind=tokens): global samples {i}, documents {listing(named)} (those whose tokens' "
        "loss was not finite)")
    assert s.step_record([i], {i: [0, row[i] - 1]}) == {"stream": "tokens", "global_samples": [i],
                                                         "documents": [list(d) for d in named]}
    # a part past the row's documents (a KSA row's padding) names none: the row's documents, all
    everything = s.describe_step([i])
    assert s.describe_step([i], {i: [row[i]]}).startswith(everything)
    # rows without document bounds: the rows named, and their documents
    r = TokenFileStream(corpus, document_bounds=False, micro_batch_size=4, global_batch_size=8, dp_rank=0, dp_size=1)
    mb = next(r)
    held = [ids[t] for t in dict.fromkeys(mb["tokens"][2].tolist() + mb["labels"][2, -1:].tolist())]
    assert r.describe_step([0], {0: [2]}) == (
        f"a token-file stream (data.kind=tokens): global samples 2 (the rows whose tokens' loss was not finite, of "
        f"0..3), documents {listing(held)}")
    assert r.step_record([0], {0: [2]}) == {"stream": "tokens", "global_samples": [2],
                                            "documents": [list(d) for d in held]}


def test_an_empty_document_is_no_segment(tmp_path):
    """megatron's own files may hold empty documents (ours leave them out): a sample's pieces skip them, so that
    piece d is still the row's segment d."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    docs = [[5] * 7, [], [6] * 3, [], [], [7] * 9, [8] * 2]
    builder = IndexedDatasetBuilder(str(tmp_path / "e.bin"), dtype=DType.optimal_dtype(512))
    for d in docs:
        builder.add_document(torch.tensor(d, dtype=torch.int64), [len(d)])
    builder.finalize(str(tmp_path / "e.idx"))
    corpus = TokenCorpus(str(tmp_path / "e"), seq_length=20, seed=1)
    tokens, starts, pieces = corpus.sources[0].sample(0)
    row = row_tensors(tokens, starts, document_bounds=True)
    cu = row["cu_seqlens"].tolist()
    names = [corpus.sources[0].document_name(p)[1] for p in pieces]
    assert all(docs[n] for n in names)   # no empty one
    assert [docs[names[d]][0] for d in range(len(cu) - 1)] == [int(row["tokens"][a]) for a in cu[:-1]]


def test_row_tensors_follow_the_documents():
    rng = np.random.default_rng(0)
    for _ in range(200):
        S = int(rng.integers(1, 40))
        tokens = rng.integers(0, 500, S + 1)
        starts = sorted(set(rng.integers(0, S + 1, int(rng.integers(0, 6))).tolist()))
        r = row_tensors(tokens, starts, document_bounds=True)
        assert r["tokens"].tolist() == tokens[:-1].tolist() and r["labels"].tolist() == tokens[1:].tolist()
        pos, mask, doc_start = [], [], 0
        for p in range(S):   # the reference: walk the row
            if p in starts:
                doc_start = p
            pos.append(p - doc_start)
            mask.append(0.0 if (p + 1) in starts else 1.0)
        assert r["position_ids"].tolist() == pos and r["loss_mask"].tolist() == mask
        assert r["cu_seqlens"].tolist() == sorted({0, S, *(s for s in starts if 0 < s < S)})
        plain = row_tensors(tokens, starts, document_bounds=False)
        assert "cu_seqlens" not in plain and plain["loss_mask"].sum() == S and plain["position_ids"].tolist() == list(range(S))


def test_blend_follows_its_weights_and_locates_any_sample():
    w = [0.5, 0.3, 0.2]
    blend = Blend(w)
    n = 2 * BLEND_CHECKPOINT + 1234
    src = blend.sources(0, n)
    for start in range(0, n - 1000, 9973):   # every window of 1,000 samples holds each source within 2 of its share
        counts = np.bincount(src[start:start + 1000], minlength=3)
        assert np.all(np.abs(counts - 1000 * np.array(w)) <= 2), (start, counts)
    local, seen = np.zeros(n, np.int64), [0, 0, 0]   # the reference: a sequential count per source
    for i, s in enumerate(src.tolist()):
        local[i], seen[s] = seen[s], seen[s] + 1
    fresh = Blend(w)
    for start, count in ((n - 50, 50), (0, 10), (BLEND_CHECKPOINT - 3, 7), (BLEND_CHECKPOINT + 5, 100)):
        s, j = fresh.locate(start, count)
        assert s.tolist() == src[start:start + count].tolist() and j.tolist() == local[start:start + count].tolist()
    assert Blend([1.0, 0.0]).sources(0, 1000).tolist() == [0] * 1000


def test_blended_corpus_draws_each_source_in_its_own_order(files):
    d, a, b = files
    S = 8
    corpus = TokenCorpus(f"{d / 'a'},{d / 'b'}", weights=[3, 1], seq_length=S, seed=9)
    alone = [TokenSource([str(d / p)], seq_length=S, seed=9, source_id=i) for i, p in enumerate("ab")]
    got = corpus.samples(0, 400)
    assert abs(sum(s == 0 for s, _, _ in got) - 300) <= 2
    nxt = [0, 0]
    for s, tokens, _ in got:   # each source's samples in its own order (its epochs wrap on their own)
        assert tokens.tolist() == alone[s].sample(nxt[s])[0].tolist()
        nxt[s] += 1


def test_stream_slices_steps_over_ranks_and_resumes(files):
    d, _, _ = files
    corpus = TokenCorpus(str(d), seq_length=16, seed=3)   # a directory: both datasets, one pool

    def draw(stream, steps):
        return [[next(stream) for _ in range(stream.num_microbatches)] for _ in range(steps)]

    kw = dict(document_bounds=True, micro_batch_size=1, global_batch_size=4)
    one = draw(TokenFileStream(corpus, dp_rank=0, dp_size=1, **kw), 5)
    ranks = [draw(TokenFileStream(corpus, dp_rank=r, dp_size=2, **kw), 5) for r in range(2)]
    for step in range(5):
        for i, mb in enumerate(ranks[0][step] + ranks[1][step]):
            assert all(torch.equal(mb[k], one[step][i][k]) for k in mb), (step, i)
    s = TokenFileStream(corpus, dp_rank=1, dp_size=2, **kw)
    draw(s, 3)
    state = s.state_dict()
    assert {k: state[k] for k in ("kind", "consumed_samples")} == {"kind": "tokens", "consumed_samples": 12}
    # another data-parallel size or global batch size continues the same global samples (12 samples are 1.5 steps
    # of 8: that resume was refused before)
    for dp, gbs in ((1, 4), (2, 4), (4, 4), (1, 8)):
        t = TokenFileStream(corpus, dp_rank=0, dp_size=dp, **{**kw, "global_batch_size": gbs})
        t.load_state_dict(state)
        assert torch.equal(next(t)["tokens"], one[3][0]["tokens"])
    with pytest.raises(ValueError, match="synthetic_tokens"):
        s.load_state_dict({"kind": "synthetic_tokens", "consumed_samples": 4})
    plain = TokenFileStream(corpus, document_bounds=False, micro_batch_size=2, global_batch_size=4, dp_rank=0, dp_size=1)
    mb = next(plain)
    assert mb["tokens"].shape == (2, 16) and "cu_seqlens" not in mb
    assert torch.equal(mb["tokens"][1], one[0][1]["tokens"][0])


def test_a_resume_whose_files_or_settings_moved_the_samples_is_refused_naming_them(tmp_path):
    """Token files added to a directory of data.tokens.paths since a checkpoint, or another seed, row length or
    blend, give global sample i another row: read from the saved position, the run would train again on documents it
    trained on and skip others (3 files of 40 documents: 27 of the 60 documents of the next 40 rows were trained on).
    The resume stops instead (the trainer's config error, train/data_streams.restore_data_state), naming
    what changed and what to do; the same files in another directory resume. (Before, each of these resumed without a
    word: a state was one integer.)"""
    from data.sample_position import DataStateMismatch
    from train.config import SettingsError
    from train.data_streams import restore_data_state

    d = tmp_path / "tok"
    for name, seed in (("a", 1), ("b", 2)):
        write_token_files(_docs(40, seed), d / name, vocab_size=512)
    kw = dict(document_bounds=True, micro_batch_size=1, global_batch_size=4, dp_rank=0, dp_size=1)

    def stream(path, **corpus):
        return TokenFileStream(TokenCorpus(str(path), **{"seq_length": 16, "seed": 3, **corpus}), **kw)

    s = stream(d)
    drawn = [next(s) for _ in range(12)]
    state = s.state_dict()
    moved = tmp_path / "elsewhere"   # the same files in another directory: the same samples
    os.rename(d, moved)
    t = stream(moved)
    t.load_state_dict(state)
    assert torch.equal(next(t)["tokens"], next(s)["tokens"]) and not torch.equal(drawn[0]["tokens"], next(t)["tokens"])
    write_token_files(_docs(40, 3), moved / "c", vocab_size=512)   # new files appended to the folder
    for corpus, named in (({}, "data.tokens.paths: c added"), ({"seed": 4}, "data.seed 3 -> 4"),
                          ({"seq_length": 8}, "train.seq_length 16 -> 8")):
        with pytest.raises(DataStateMismatch, match=named):
            stream(moved, **corpus).load_state_dict(state)
    with pytest.raises(SettingsError) as e:
        restore_data_state([stream(moved)], state, checkpoint="ck/step_3", run_dir="runs/r")
    assert str(e.value) == (
        "the data state of ck/step_3 cannot be continued: the token files' global samples differ from those the state "
        "was saved with (data.tokens.paths: c added): read from the saved position, the run would train again on "
        "documents it trained on and skip others; to continue it exactly, launch it with the data.tokens, data.seed "
        "and train.seq_length settings it was saved with; to go on from its weights instead, start another run "
        "directory from them: run_dir=<a new directory> train.checkpoint.init_from=runs/r (its data from the "
        "beginning, a fresh optimizer)")
    a, b = f"{moved / 'a'}", f"{moved / 'b'}"   # a blend one of whose sources is left out (weight 0)
    s = TokenFileStream(TokenCorpus(f"{a},{b}", weights=[3, 1], seq_length=16, seed=3), **kw)
    with pytest.raises(DataStateMismatch, match=r"data.tokens.weights \[3.0, 1.0\] -> \[1.0, 0.0\]"):
        TokenFileStream(TokenCorpus(f"{a},{b}", weights=[1, 0], seq_length=16, seed=3), **kw).load_state_dict(
            s.state_dict())


def test_a_blend_resumed_with_other_weights_continues_each_source_where_it_stopped(files, caplog):
    """data.tokens.weights changed on resume (a mixture re-weighted mid-run): each source goes on with its next sample
    and the new weights give the shares from the saved position on. Reference: each source alone (TokenSource), read
    in order, none of its samples repeated or skipped; the shares of the new weights within 2 samples (the Weyl
    sequence's bound); a second resume with those weights continues the first bit for bit. (Before, the state was one
    integer and the new blend mapped the saved position elsewhere: the sources' next samples jumped.)"""
    import logging

    d, _, _ = files
    paths, S, kw = f"{d / 'a'},{d / 'b'}", 8, dict(document_bounds=True, micro_batch_size=1, global_batch_size=4,
                                                   dp_rank=0, dp_size=1)

    def stream(weights):
        return TokenFileStream(TokenCorpus(paths, weights=weights, seq_length=S, seed=9), **kw)

    def draw(st, n):   # (source, tokens) of n rows, the source told by which one's sample the row equals
        return [next(st)["tokens"][0] for _ in range(n)]

    alone = [TokenSource([str(d / p)], seq_length=S, seed=9, source_id=i) for i, p in enumerate("ab")]
    first = stream([3, 1])
    rows = draw(first, 40)
    second = stream([1, 3])
    with caplog.at_level(logging.WARNING, logger="data.token_files"):
        second.load_state_dict(first.state_dict())
    assert "data.tokens.weights [3.0, 1.0] -> [1.0, 3.0] from global sample 40 on" in caplog.text
    rows += draw(second, 400)
    nxt, after = [0, 0], [0, 0]
    for i, row in enumerate(rows):   # each row is its source's next sample
        s = next(k for k in (0, 1) if torch.equal(row, torch.from_numpy(alone[k].sample(nxt[k])[0][:-1])))
        nxt[s] += 1
        after[s] += i >= 40
    assert abs(after[1] - 300) <= 2 and sum(nxt) == 440
    third = stream([1, 3])
    third.load_state_dict(second.state_dict())   # the history of weights travels in the state
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip([next(second) for _ in range(40)],
                                                                     [next(third) for _ in range(40)]))



def test_weights_added_or_removed_on_resume_are_refused_naming_them(files):
    """data.tokens.weights set on resume of a run saved without them (one pool become a blend) moves every sample, as
    their removal does: both are refused naming the change. (Adding them stopped the resume with a TypeError,
    `len(None)`, naming no setting.)"""
    from data.sample_position import DataStateMismatch

    d, _, _ = files
    kw = dict(document_bounds=True, micro_batch_size=1, global_batch_size=4, dp_rank=0, dp_size=1)

    def stream(weights):
        return TokenFileStream(TokenCorpus(f"{d / 'a'},{d / 'b'}", weights=weights, seq_length=8, seed=9), **kw)

    pool, blend = stream(None), stream([0.7, 0.3])
    for s in (pool, blend):
        [next(s) for _ in range(8)]
    with pytest.raises(DataStateMismatch, match=r"data.tokens.weights None -> \[0.7, 0.3\]"):
        stream([0.7, 0.3]).load_state_dict(pool.state_dict())
    with pytest.raises(DataStateMismatch, match=r"data.tokens.weights \[0.7, 0.3\] -> None"):
        stream(None).load_state_dict(blend.state_dict())


def test_weights_of_a_lone_source_changed_on_resume_continue_it(files):
    """Weights where one source alone has weight > 0 ([1] -> [2], [1, 0] -> [2, 0]) give the same samples: that
    source takes each one. The resume continues (it was refused saying the samples differ). Reference: the run that
    was not interrupted."""
    d, _, _ = files
    kw = dict(document_bounds=True, micro_batch_size=1, global_batch_size=4, dp_rank=0, dp_size=1)
    for paths, before, after in ((str(d / "a"), [1], [2]), (f"{d / 'a'},{d / 'b'}", [1, 0], [2, 0]),
                                 (f"{d / 'a'},{d / 'b'}", [0, 1], [0, 3.5])):
        def stream(weights):
            return TokenFileStream(TokenCorpus(paths, weights=weights, seq_length=8, seed=9), **kw)

        whole = stream(before)
        ref = [next(whole)["tokens"] for _ in range(20)]
        first = stream(before)
        [next(first) for _ in range(8)]
        second = stream(after)
        second.load_state_dict(first.state_dict())
        assert all(torch.equal(next(second)["tokens"], r) for r in ref[8:]), (paths, before, after)


def test_a_prefix_json_that_is_not_a_sidecar_is_no_sidecar(tmp_path):
    """A PREFIX.json beside files written elsewhere (the JSON lines they came from, a JSON list) is not the sidecar:
    sidecar() is None and the launch checks pass (they stopped with 'config error: Extra data: line 2 column 1' or an
    AttributeError). Reference: the same files without a PREFIX.json."""
    from types import SimpleNamespace

    from train.launch import check_token_paths

    write_token_files(_docs(40, 1), tmp_path / "web", vocab_size=512)
    cfg = SimpleNamespace(model=SimpleNamespace(lm=SimpleNamespace(vocab_size=512)), train=SimpleNamespace(
        seq_length=8), data=SimpleNamespace(tokens=SimpleNamespace(paths=str(tmp_path / "web"), eval_paths="",
                                                                   weights=None)))
    for foreign in ('{"text": "a"}\n{"text": "b"}\n', '[1, 2, 3]', '"web"', '{"format": "other"}', "\xff\xfe",
                    "[" * 100000 + "]" * 100000):
        (tmp_path / "web.json").write_bytes(foreign.encode("latin-1"))
        assert sidecar(str(tmp_path / "web")) is None, foreign[:20]
        check_token_paths(cfg)
    (tmp_path / "web.json").unlink()
    assert sidecar(str(tmp_path / "web")) is None



def _documents_named_by_their_ids(tmp_path) -> dict:
    """Files a and b whose documents' tokens are one id of their own: token id -> (file prefix, document number)."""
    rng = np.random.default_rng(5)
    ids = {}
    for f, (first, n) in (("a", (1, 57)), ("b", (200, 31))):
        docs = [[first + i] * int(rng.integers(1, 40)) for i in range(n)]
        write_token_files(docs, tmp_path / f, vocab_size=512)
        ids.update({first + i: (str(tmp_path / f), i) for i in range(n)})
    return ids


def listing(docs):
    by_file = {}
    for prefix, n in docs:
        by_file.setdefault(prefix, []).append(str(n))
    return "; ".join(f"{prefix}: {', '.join(ns)}" for prefix, ns in by_file.items())


def test_a_step_is_described_by_the_documents_its_rows_hold(tmp_path):
    """describe_step (the message of a step whose gradients were not finite) names the step's global samples and
    the documents they hold, by file and document number. Reference: each document's tokens are one id of its own,
    so the ids in the rows drawn (tokens and each row's last label) name them, in the order they appear."""
    ids = _documents_named_by_their_ids(tmp_path)

    def drawn(stream, micro):
        seen = {}
        for _ in range(micro):
            mb = next(stream)
            for row, labels in zip(mb["tokens"], mb["labels"]):
                for t in row.tolist() + labels[-1:].tolist():
                    seen.setdefault(ids[t], None)
        return list(seen)

    kw = dict(seq_length=16, seed=3)
    for corpus in (TokenCorpus(str(tmp_path), **kw),                                      # one pool
                   TokenCorpus(f"{tmp_path / 'a'},{tmp_path / 'b'}", weights=[1, 1], **kw)):  # a blend
        s = TokenFileStream(corpus, document_bounds=True, micro_batch_size=1, global_batch_size=8, dp_rank=1,
                            dp_size=2)
        drawn(s, 4)           # step 1
        ref = drawn(s, 3)     # step 2, part way: its 3 samples so far (global 12..14)
        assert s.describe_step() == (f"a token-file stream (data.kind=tokens): global samples 12..14, documents "
                                     f"{listing(ref)}")
        assert len(ref) >= 3
    many = TokenFileStream(TokenCorpus(str(tmp_path / "a"), **kw), document_bounds=False, micro_batch_size=4,
                           global_batch_size=32, dp_rank=0, dp_size=1)
    ref = drawn(many, 8)
    assert len(ref) > 32
    assert many.describe_step().endswith(f"global samples 0..31, documents {listing(ref[:32])}; +{len(ref) - 32} more")


def test_a_held_out_set_scored_whole_fills_its_last_batch_with_rows_that_count_for_nothing(files):
    """one_epoch (train.eval.batches=0): over ranks, the first epoch's rows come once each with their loss mask, as
    the plain stream gives them; the rows after them that fill the last global batch have a zero mask, and
    `padding` says which micro-batches are only such rows. A blend has no one first epoch."""
    d, _, _ = files
    corpus = TokenCorpus(str(d), seq_length=16, seed=3)
    rows = corpus.sources[0].per_epoch
    gbs = 4
    assert rows % gbs, rows          # the last global batch is filled up
    batches = -(-rows // gbs)
    plain = TokenFileStream(corpus, document_bounds=True, micro_batch_size=1, global_batch_size=gbs, dp_rank=0,
                            dp_size=1)
    ref = [next(plain) for _ in range(batches * gbs)]   # global rows 0 .. batches * gbs - 1 in order
    ranks = [TokenFileStream(corpus, document_bounds=True, micro_batch_size=1, global_batch_size=gbs, dp_rank=r,
                             dp_size=2, one_epoch=True) for r in range(2)]
    assert [s.samples_per_epoch for s in ranks] == [rows, rows]
    scored = []
    for step in range(batches):
        for r, s in enumerate(ranks):
            for i in range(s.num_microbatches):
                j = step * gbs + r * 2 + i           # the row's global index
                mb = next(s)
                assert torch.equal(mb["tokens"], ref[j]["tokens"])
                if j < rows:
                    assert torch.equal(mb["loss_mask"], ref[j]["loss_mask"]) and mb["loss_mask"].any()
                    scored.append(j)
                else:
                    assert not mb["loss_mask"].any()
    assert scored == sorted(scored) and sorted(scored) == list(range(rows))
    flags = [f for step in range(batches) for r in range(2) for f in ranks[r].padding[step * 2:step * 2 + 2]]
    assert flags == [j >= rows for j in range(batches * gbs)]
    # two rows per micro-batch: one holding the last real row and a filler is not padding; its filler is masked
    two = TokenFileStream(corpus, document_bounds=False, micro_batch_size=2, global_batch_size=gbs, dp_rank=0,
                          dp_size=1, one_epoch=True)
    mbs = [next(two) for _ in range(batches * 2)]
    masks = torch.cat([mb["loss_mask"] for mb in mbs])
    assert masks[:rows].all() and not masks[rows:].any()
    assert two.padding == [2 * k >= rows for k in range(batches * 2)]
    with pytest.raises(ValueError, match="a blend of token sources"):
        TokenFileStream(TokenCorpus(f"{d / 'a'},{d / 'b'}", weights=[1, 1], seq_length=16, seed=3),
                        document_bounds=True, micro_batch_size=1, global_batch_size=gbs, dp_rank=0, dp_size=1,
                        one_epoch=True)


def test_bad_settings_and_files_are_named(files, tmp_path):
    d, _, _ = files
    with pytest.raises(ValueError, match=r"nope.*names no indexed dataset"):
        resolve_prefixes(f"{d / 'a'},{tmp_path / 'nope'}/*")
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"half\.idx does not exist"):
        resolve_prefixes(str(tmp_path / "half"))
    assert resolve_prefixes(f"{d / 'a.idx'}, {d / 'b.bin'}") == [[str(d / "a")], [str(d / "b")]]
    assert resolve_prefixes(str(d)) == [[str(d / "a"), str(d / "b")]]
    with pytest.raises(ValueError, match=r"2 weight\(s\) for 1 path"):
        TokenFilesConfig(paths=str(d / "a"), weights=[1, 2])
    with pytest.raises(ValueError, match="must be >= 0"):
        TokenFilesConfig(paths=f"{d / 'a'},{d / 'b'}", weights=[1, -1])
    with pytest.raises(ValueError, match=r"fewer than one sample of train.seq_length \+ 1 = 100001"):
        TokenSource([str(d / "a")], seq_length=100000, seed=0, source_id=0)
    big = TokenSource([str(d / "a")], seq_length=16, seed=0, source_id=0, vocab_size=100)
    with pytest.raises(ValueError, match=r"a: document \d+ holds token id \d+, outside model.lm.vocab_size \(100\)"):
        for j in range(big.per_epoch):
            big.sample(j)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        write_token_files([[1, 2, 600]], tmp_path / "over", vocab_size=512)
    with pytest.raises(ValueError, match="train.micro_batch_size must be 1"):
        TokenFileStream(TokenCorpus(str(d / "a"), seq_length=8, seed=0), document_bounds=True, micro_batch_size=2,
                        global_batch_size=4, dp_rank=0, dp_size=1)


def test_a_glob_names_the_prefixes_of_its_matches(tmp_path):
    """A glob matching the files tokenize_text writes beside a prefix ('/dir/*', '/dir/a*') took PREFIX.json for a
    prefix: 'config error: ... dir/a.json.bin and dir/a.json.idx do not exist'. Its matches name the prefixes of their
    .bin and .idx (and a directory's, as docs/data.md says paths are directories or globs of either); the sidecar,
    skipped lines, lock and partial files and other files name none; a glob naming no prefix is an error naming it.
    Reference: the prefixes written, and IndexedDataset's document counts."""
    import re

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    d = tmp_path / "tok"
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(30)))
    for name in ("a", "ab"):
        tokenize_jsonl([str(tmp_path / "in.jsonl")], d / name, TOK)
    write_token_files(_docs(20, 3), d / "sub" / "c", vocab_size=512)
    for name in ("a.lock", "a.bin.host.1.partial", "ab.idx.partial", "notes.txt"):
        (d / name).write_text("x")
    a, ab, c = str(d / "a"), str(d / "ab"), str(d / "sub" / "c")
    for spec, want in ((f"{d}/*", [a, ab, c]), (f"{d}/a*", [a, ab]), (f"{d}/a.*", [a]), (f"{tmp_path}/t?k/", [a, ab]),
                       (f"{d}/*.json", None), (f"{d}/a.j*", None)):
        if want is None:
            with pytest.raises(ValueError, match=rf"paths=.*: '{re.escape(spec)}' names no indexed dataset"):
                resolve_prefixes(spec)
            continue
        assert resolve_prefixes(spec) == [want], spec
        corpus = TokenCorpus(spec, seq_length=8, seed=0)
        assert corpus.sources[0].documents == sum(len(IndexedDataset(p)) for p in want)
    (d / "half.bin").write_bytes(b"")          # half a dataset that a glob matches is still named
    with pytest.raises(ValueError, match=r"half\.idx does not exist"):
        resolve_prefixes(f"{d}/h*")


def test_a_prefix_named_twice_is_refused(files, tmp_path):
    """A prefix named twice (a directory and a prefix in it, 'a,a.bin', a folder and a link to it; in a blend too)
    was read twice an epoch without a word: refused, naming the prefix and both parts that name it, as the launch
    refuses video shards named twice. A prefix in two held-out sets is scored in each: allowed. Reference: the
    documents the pool would read, counted by IndexedDataset."""
    from types import SimpleNamespace

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from train.launch import check_token_paths

    d, _, _ = files
    a = str(d / "a")
    os.symlink(d, tmp_path / "link")
    for spec, what in ((f"{d},{a}", f"{a} is named twice, by '{d}' and by '{a}'"),
                       (f"{a},{a}.bin", f"{a} is named twice, by '{a}' and by '{a}.bin'"),
                       (f"{a}, {d}/a*", f"{a} is named twice, by '{a}' and by '{d}/a*'"),
                       (f"{d},{tmp_path / 'link'}", f"{a} (named by '{d}') and {tmp_path / 'link' / 'a'} (by "
                                                   f"'{tmp_path / 'link'}') are the same files")):
        with pytest.raises(ValueError) as e:
            TokenCorpus(spec, seq_length=8, seed=0)
        assert str(e.value) == (f"data.tokens.paths={spec!r}: {what}: its documents would be read twice an epoch. "
                                f"Name each prefix once"), spec
    with pytest.raises(ValueError, match="read twice an epoch"):
        TokenCorpus(f"{a},{a}", weights=[1, 1], seq_length=8, seed=0)
    # once each: the pool holds each document once
    assert TokenCorpus(f"{a},{d / 'b'}", seq_length=8, seed=0).sources[0].documents == sum(
        len(IndexedDataset(str(d / p))) for p in "ab")

    def cfg(paths, eval_paths=""):
        return SimpleNamespace(model=SimpleNamespace(lm=SimpleNamespace(vocab_size=512)), train=SimpleNamespace(
            seq_length=8), data=SimpleNamespace(tokens=SimpleNamespace(paths=paths, eval_paths=eval_paths,
                                                                       weights=None)))

    with pytest.raises(ValueError, match=rf"data.tokens.paths=.*{a} is named twice"):
        check_token_paths(cfg(f"{d},{a}"))
    write_token_files(_docs(30, 4), tmp_path / "train", vocab_size=512)
    check_token_paths(cfg(str(tmp_path / "train"), f"all={d},web={a}"))      # one prefix in two held-out sets
    with pytest.raises(ValueError, match=rf"data.tokens.eval_paths=.*{a} is named twice"):
        check_token_paths(cfg(str(tmp_path / "train"), f"{d},{a}"))


def test_a_truncated_bin_or_idx_is_named_at_the_launch(tmp_path):
    """A .bin or .idx cut short (an interrupted copy) passed the launch checks; the run then failed with megatron's
    'buffer is smaller than requested size', naming no file, at the launch or mid-run at the first row past the cut.
    The launch and TokenSource compare the .bin's size with what the .idx indexes (read field by field), naming the
    file, what is wrong and what to do. Reference: the whole files megatron's IndexedDataset reads back, and their
    sizes."""
    import shutil
    from types import SimpleNamespace

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from train.launch import check_token_paths

    docs = _docs(60, 8)
    write_token_files(docs, tmp_path / "whole", vocab_size=512)
    ds = IndexedDataset(str(tmp_path / "whole"))
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    bin_bytes, idx_bytes = (tmp_path / "whole.bin").read_bytes(), (tmp_path / "whole.idx").read_bytes()
    assert len(bin_bytes) == 2 * sum(map(len, docs))               # uint16 ids
    cases = {"bin_short": (bin_bytes[:-6], idx_bytes, r"bin holds \d+ bytes, but .*idx indexes \d+ \(60 sequences of "
                                                       r"uint16\): the \.bin is cut short"),
             "bin_empty": (b"", idx_bytes, r"bin holds 0 bytes, but .*idx indexes \d+.*cut short"),
             "bin_long": (bin_bytes + b"\0\0", idx_bytes, r"bin holds \d+ bytes.*longer than its index says"),
             "idx_short": (bin_bytes, idx_bytes[:len(idx_bytes) // 2], r"idx holds \d+ bytes, fewer than the \d+ its "
                                                                      r"header's 60 sequences .*cut short"),
             "idx_header": (bin_bytes, idx_bytes[:20], r"idx is not a megatron indexed-dataset index \(20 bytes, cut "
                                                       r"short in its header\)"),
             "idx_foreign": (bin_bytes, b"PK\3\4" + idx_bytes[4:], r"idx is not a megatron .*another header")}
    for name, (b, i, why) in cases.items():
        (tmp_path / f"{name}.bin").write_bytes(b)
        (tmp_path / f"{name}.idx").write_bytes(i)
        prefix = str(tmp_path / name)
        with pytest.raises(ValueError, match=rf"{prefix}\.{why}.*copy the prefix again, or write it again"):
            TokenSource([prefix], seq_length=8, seed=0, source_id=0)
        cfg = SimpleNamespace(model=SimpleNamespace(lm=SimpleNamespace(vocab_size=512)), train=SimpleNamespace(
            seq_length=8), data=SimpleNamespace(tokens=SimpleNamespace(paths=prefix, eval_paths="", weights=None)))
        with pytest.raises(ValueError, match=rf"data\.tokens\.paths: {prefix}\.{why}"):
            check_token_paths(cfg)
    shutil.copy(tmp_path / "whole.bin", tmp_path / "copy.bin")
    shutil.copy(tmp_path / "whole.idx", tmp_path / "copy.idx")
    src = TokenSource([str(tmp_path / "copy")], seq_length=8, seed=0, source_id=0)   # a whole copy reads
    assert src.documents == 60 and src.tokens == sum(map(len, docs))



# ---- token files in the packed video loader's mixture (data.video.text_tokens) -----------------------------

@pytest.fixture(scope="module")
def text_tokens(tmp_path_factory):
    d = tmp_path_factory.mktemp("vl_tok")
    tok = ByteTokenizer()
    write_token_files((tok.encode(t) + [tok.eos_id] for t in synthetic_documents(300, 4)), d / "web", vocab_size=512,
                      meta={"tokenizer": repr(tok), "eos_id": tok.eos_id})
    return str(d / "web")


def _mixed_cfg(shard_dir, text_tokens, tmp_path, **kw):
    from .conftest import small_cfg
    kw.setdefault("decode_isolation", "inline")
    kw.setdefault("text_tokens_fraction", 0.3)
    return small_cfg(shard_dir, tmp_path, text_tokens=text_tokens, **kw)


def test_token_rows_mix_into_the_video_packs(shard_dir, text_tokens, tmp_path):
    """A share of the packs are rows of the token files, in the token source's own order (TokenSource read alone
    is the reference), as text-only packs: the row's tokens, the next token as label except across a document
    boundary, positions restarting per document on all three M-RoPE rows, no frames; the other packs are the
    videos' packs as the videos alone would give them; a resume mid-stream is exact."""
    from data.video.loader import VideoPackedLoader

    from .test_loader import signature, take

    cfg = _mixed_cfg(shard_dir, text_tokens, tmp_path, num_workers=2)
    packs = take(VideoPackedLoader(cfg, seed=3), 24)
    rows = [p for p in packs if p.source == "tokens"]
    assert 4 <= len(rows) <= 11 and {p.source for p in packs} == {"short", "tokens"}
    alone = TokenSource([text_tokens], seq_length=cfg.seq_len, seed=3, source_id=0)
    for j, p in enumerate(rows):
        tokens, starts, _ = alone.sample(j)
        ref = row_tensors(tokens, starts, document_bounds=True)
        assert (p.epoch * alone.per_epoch + p.pack_index) == j
        assert torch.equal(p.tokens, ref["tokens"]) and torch.equal(p.cu_seqlens, ref["cu_seqlens"])
        assert torch.equal(p.loss_mask, ref["loss_mask"])
        assert torch.equal(p.labels[p.loss_mask > 0], torch.from_numpy(tokens[1:])[p.loss_mask > 0])
        assert bool((p.labels[p.loss_mask == 0] == cfg.label_ignore_index).all())
        assert torch.equal(p.position_ids, ref["position_ids"].expand(3, -1))
        assert p.pixel_values.shape[0] == 0 and p.grid_thw.shape[0] == 0 and p.text_docs == p.num_docs >= 1
        assert all(k.startswith("web#") for k in p.sample_keys)
    videos = [signature(p) for p in packs if p.source == "short"]
    alone_videos = VideoPackedLoader(_mixed_cfg(shard_dir, "", tmp_path, text_tokens_fraction=0.0), seed=3)
    assert videos == [signature(p) for p in take(alone_videos, len(videos))]
    a = VideoPackedLoader(cfg, seed=3)
    first = [signature(p) for p in take(a, 10)]
    state = a.state_dict()
    a.close()
    b = VideoPackedLoader(cfg, seed=3)
    b.load_state_dict(state)
    assert first + [signature(p) for p in take(b, 14)] == [signature(p) for p in packs]
    assert b.stats["sources"]["tokens"]["packs"] == len(rows)
    b.close()


def test_token_rows_in_a_mixture_are_checked(shard_dir, text_tokens, tmp_path):
    from data.video.loader import VideoPackedLoader

    with pytest.raises(ValueError, match="text_tokens_fraction.*no token files"):
        _mixed_cfg(shard_dir, "", tmp_path)
    with pytest.raises(ValueError, match=r"text_tokens_fraction.*\[0, 1\)"):
        _mixed_cfg(shard_dir, text_tokens, tmp_path, text_tokens_fraction=1.0)
    wide = tmp_path / "wide"
    write_token_files([[1, 2, 3] * 400], wide, vocab_size=151936, meta={"tokenizer": "Qwen", "eos_id": 151643})
    with pytest.raises(ValueError, match=r"text_tokens: .*wide was tokenized with Qwen \(vocab_size 151936, eos "
                                         r"151643\), the video documents with ByteTokenizer"):
        VideoPackedLoader(_mixed_cfg(shard_dir, str(wide), tmp_path), seed=0)
    one = VideoPackedLoader(_mixed_cfg(shard_dir, "", tmp_path, text_tokens_fraction=0.0), seed=0)
    state = one.state_dict()
    with pytest.raises(ValueError, match="data.video.text_tokens was added"):
        VideoPackedLoader(_mixed_cfg(shard_dir, text_tokens, tmp_path), seed=0).load_state_dict(state)


def test_tokenize_text_command(tmp_path, capsys):
    """launch/tokenize_text.py: writes the files, says what it left out, and refuses to overwrite or to guess."""
    from launch.tokenize_text import main

    (tmp_path / "in.jsonl").write_text('{"text": "one"}\n{"txt": "two"}\n{"text": "three"}\n')
    out = str(tmp_path / "tok" / "in")
    assert main(["--input", str(tmp_path / "in.jsonl"), "--out", out]) == 0
    assert "2 documents" in capsys.readouterr().out and sidecar(out)["skipped_lines"] == 1
    for argv, needle in ((["--input", str(tmp_path / "in.jsonl"), "--out", out], "in.idx exists"),
                         (["--input", str(tmp_path / "nope.jsonl"), "--out", out + "2"], "nope.jsonl: no such file"),
                         (["--out", out + "3"], "give --input FILES or --synthetic N"),
                         (["--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tmp_path), "--out", out + "4"],
                          "--tokenizer = .*holds no tokenizer.json")):
        with pytest.raises(SystemExit):
            main(argv)
        assert __import__("re").search(needle, capsys.readouterr().err), (argv, needle)
    assert main(["--synthetic", "30", "--out", out + "5"]) == 0 and sidecar(out + "5")["documents"] == 30
    assert main(["--input", str(tmp_path / "in.jsonl"), "--out", out + "6", "--workers", "2"]) == 0
    assert (tmp_path / "tok" / "in6.bin").read_bytes() == (tmp_path / "tok" / "in.bin").read_bytes()


def test_an_out_that_is_a_directory_is_refused(tmp_path, capsys):
    """--out od/ (or an existing directory) wrote the hidden files od/.bin, od/.idx, od/.json: refused, naming --out,
    writing nothing; write_token_files refuses such a prefix too."""
    from launch.tokenize_text import main

    (tmp_path / "in.jsonl").write_text('{"text": "one"}\n')
    (tmp_path / "od").mkdir()
    for out in (f"{tmp_path / 'od'}/", str(tmp_path / "od"), f"{tmp_path / 'new'}/"):
        with pytest.raises(SystemExit) as e:
            main(["--input", str(tmp_path / "in.jsonl"), "--out", out])
        assert e.value.code == 2 and f"--out {out}: names a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["in.jsonl", "od"]
    with pytest.raises(ValueError, match="names a directory"):
        write_token_files([[1, 2]], f"{tmp_path / 'od'}/", vocab_size=512)
    assert not list((tmp_path / "od").iterdir())


def test_a_prefix_is_written_by_one_writer_at_a_time(tmp_path, capsys):
    """Two runs of tokenize_text into one prefix at once both wrote PREFIX.bin.partial (the builder opens it "wb"):
    the files were corrupt and one run reported success. A writer holds PREFIX.lock for the whole write; a second one
    is refused naming the prefix and the holder's pid, and leaves the first's files alone. The partial files have
    names of the writer's own; those a killed writer left go when the lock is taken. Reference: IndexedDataset reading
    the first writer's documents back."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data.node_files import host_name
    from launch.tokenize_text import main

    docs, out, d = _docs(50, 7), tmp_path / "c" / "same", tmp_path / "c"
    d.mkdir()
    stale = ["same.bin.partial", "same.idx.partial", "same.json.partial", "same.bin.otherhost.12.partial"]
    others = ["same.v2.bin.h.1.partial", "samex.bin.partial"]      # another prefix's: kept
    for name in stale + others:
        (d / name).write_bytes(b"old")
    started, go, written = threading.Event(), threading.Event(), []

    def slow():
        for i, doc in enumerate(docs):
            if i == 10:
                started.set()
                go.wait(60)
            yield doc

    first = threading.Thread(target=lambda: written.append(write_token_files(slow(), out, vocab_size=512)))
    first.start()
    try:
        assert started.wait(60)
        mine = f"same.bin.{host_name()}.{os.getpid()}.partial"
        assert sorted(p.name for p in d.iterdir()) == sorted(others + [mine, "same.lock"])
        holder = rf"host {host_name()} pid {os.getpid()} holds {out}\.lock"
        with pytest.raises(OSError, match=rf"{out}: another process is writing this prefix \({holder}\)"):
            write_token_files([[1, 2]], out, vocab_size=512)
        (tmp_path / "in.jsonl").write_text('{"text": "second writer"}\n')
        assert main(["--input", str(tmp_path / "in.jsonl"), "--out", str(out), "--workers", "1"]) == 1
        err = capsys.readouterr().err
        assert f"{out}: another process is writing this prefix (host {host_name()} pid {os.getpid()}" in err, err
    finally:
        go.set()
        first.join(60)
    ds = IndexedDataset(str(out))
    assert [ds[i].tolist() for i in range(len(ds))] == docs and written[0]["documents"] == len(docs)
    assert sorted(p.name for p in d.iterdir()) == sorted(others + ["same.bin", "same.idx", "same.json"])
    with pytest.raises(FileExistsError, match=rf"{out}\.idx exists"):   # the command's: no write over a finished one
        tokenize_jsonl([str(tmp_path / "in.jsonl")], out, TOK, replace=False)
    assert [ds[i].tolist() for i in range(len(ds))] == docs


def test_an_input_that_is_one_of_the_outputs_is_refused(tmp_path, capsys):
    """--input ow/web.json --out ow/web replaced the input with the sidecar (the lines were gone). Any output name (the
    .bin, .idx, .json, .skipped.jsonl, lock and partial files), by its own path, through a link to it or a hard link,
    is refused (exit 2) naming the input, and the input is left as it was. Reference: the input's bytes."""
    from launch.tokenize_text import main

    d = tmp_path / "ow"
    d.mkdir()
    body = b'{"text": "the only copy"}\n'
    cases = {"web.json": None, "web.skipped.jsonl": None, "web.bin": None, "web.lock": None,
             "web.idx.partial": None, "web.bin.host.7.partial": None, "link.jsonl": "web.json", "hard.jsonl": "hard"}
    for name, how in cases.items():
        for f in d.iterdir():
            f.unlink()
        path = d / name
        if how == "hard":
            (d / "web.skipped.jsonl").write_bytes(body)
            os.link(d / "web.skipped.jsonl", path)
        else:
            path.write_bytes(body)
            if how is not None:
                os.symlink(path, d / how)
        for argv in (["--input", str(path), "--out", str(d / "web")],
                     ["--input", str(tmp_path / ".." / tmp_path.name / "ow" / name), "--out", f"{d}/./web"]):
            with pytest.raises(SystemExit) as e:
                main(argv)
            err = capsys.readouterr().err
            assert e.value.code == 2 and f"--input {argv[1]}: is " in err and "give another --out" in err, (name, err)
            assert path.read_bytes() == body
        with pytest.raises(ValueError, match=f"{path}: is .*, a file that writing {d / 'web'} replaces"):
            tokenize_jsonl([str(path)], d / "web", TOK)
        assert path.read_bytes() == body and not (d / "web.idx").exists()
    (tmp_path / "in.jsonl").write_bytes(body)     # a name beside the outputs that is none of them
    assert main(["--input", str(tmp_path / "in.jsonl"), "--out", str(d / "web.v2")]) == 0


def test_a_truncated_or_foreign_gz_input_is_named_not_a_traceback(tmp_path, capsys):
    """tokenize_text.py given a .jsonl.gz cut short ended in gzip's EOFError traceback, naming no file (and left
    PREFIX.bin.partial behind); a .gz that is not gzip said 'Not a gzipped file', naming none either."""
    import gzip

    from launch.tokenize_text import main

    whole = gzip.compress("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(200)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "plain.jsonl.gz").write_text('{"text": "not compressed"}\n')
    for name, why in (("cut.jsonl.gz", "EOFError"), ("plain.jsonl.gz", "BadGzipFile")):
        for workers in ("1", "2"):
            out = str(tmp_path / "tok" / f"{name}{workers}")
            assert main(["--input", str(tmp_path / name), "--out", out, "--workers", workers]) == 1
            err = capsys.readouterr().err
            assert f"{tmp_path / name}: unreadable after line " in err and why in err, err
            assert not list((tmp_path / "tok").glob("*")), "no file, not even a partial one, is left"


def test_no_document_written_is_an_error_and_an_empty_prefix_is_named(tmp_path, capsys):
    """tokenize_text.py with a --key no line has exited 0 leaving an empty .bin, which a run later met as megatron's
    'cannot mmap an empty file', naming no prefix."""
    from types import SimpleNamespace

    from launch.tokenize_text import main
    from train.launch import check_token_paths

    (tmp_path / "in.jsonl").write_text('{"content": "one"}\n{"content": "two"}\n')
    out = str(tmp_path / "tok" / "in")
    assert main(["--input", str(tmp_path / "in.jsonl"), "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"no document written to {out}" in err and "--key 'text'" in err and "in.skipped.jsonl" in err
    assert not any(os.path.exists(out + ext) for ext in (".bin", ".idx", ".json"))
    # such a prefix (an empty .bin, as the command wrote it before) is named by the reader and the launch check
    tokenize_jsonl([str(tmp_path / "in.jsonl")], out, ByteTokenizer())
    assert os.path.getsize(out + ".bin") == 0
    with pytest.raises(ValueError, match=rf"{out}\.bin is empty: no token in this prefix"):
        TokenSource([out], seq_length=8, seed=0, source_id=0)
    cfg = SimpleNamespace(model=SimpleNamespace(lm=SimpleNamespace(vocab_size=512)),
                          data=SimpleNamespace(tokens=SimpleNamespace(paths=out, eval_paths="")))
    with pytest.raises(ValueError, match=rf"data\.tokens\.paths: {out}\.bin is empty"):
        check_token_paths(cfg)


def test_token_rows_epoch_orders_in_a_mixture_go_as_the_rank_consumes_past_them(shard_dir, tmp_path):
    """data.video.text_tokens with its index_dir: the loader, as it consumes token rows, removes the epoch orders of
    the epochs it is past (loader._release -> TokenPacks.release), keeping the one before its own; mapping a later
    epoch removes none. The rows are those of the source read alone."""
    from data.video.loader import VideoPackedLoader

    from .test_loader import take

    write_token_files(([TOK.eos_id + 1 + (i * 7 + k) % 200 for k in range(100)] + [TOK.eos_id] for i in range(30)),
                      tmp_path / "tok" / "web", vocab_size=TOK.vocab_size,
                      meta={"tokenizer": repr(TOK), "eos_id": TOK.eos_id})
    spec = str(tmp_path / "tok" / "web")
    disk = VideoPackedLoader(_mixed_cfg(shard_dir, spec, tmp_path, text_tokens_fraction=0.75,
                                        text_tokens_index_dir=str(tmp_path / "tix")), seed=3)
    source = disk.planners[-1].source
    assert source.per_epoch == 2                      # 3030 tokens, rows of 1024: each epoch two packs
    rows = [p for p in take(disk, 16) if p.source == "tokens"]
    last = rows[-1].epoch
    assert last >= 4
    on_disk = sorted(int(f.name[5:].split(".")[0]) for f in source.index_dir.glob("epoch*.rows.npy"))
    assert on_disk == [last - 1, last]
    alone = TokenSource([spec], seq_length=1024, seed=3, source_id=0)
    assert all(p.tokens.tolist() == alone.sample(p.epoch * 2 + p.pack_index)[0][:-1].tolist() for p in rows)
