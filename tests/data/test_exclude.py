"""data.exclude (data/exclude.py): samples named in files are left out of the training data, nothing else moves.

References: for token files, rows read without the list, whose documents' tokens are one id of their own (so a
token's id names its document): the left-out documents' ids become padding without loss, every other token, label,
position and bound is the same (without document bounds the row's other tokens close up first, the padding at its
end). For video packs, the pack built without the list with the left-out document's
segment cut out (its tokens, its frames' patches and grids): the documents of a pack are built apart and laid end to
end, so the rest must be the same, padded at the end; every other pack is the same.
"""
import json
from types import SimpleNamespace

import pytest
import torch

from data.exclude import ExcludeError, read_exclude
from data.token_files import TokenCorpus, TokenFileStream, TokenPacks
from data.video.loader import VideoPackedLoader
from data.video.tokenizer import ByteTokenizer
from data.video_stream import VideoBatchStream
from train.trainer import token_documents

from .conftest import small_cfg
from .test_token_files import _documents_named_by_their_ids


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_the_files_name_samples_as_the_messages_and_records_do(tmp_path):
    record = {"step": 3, "action": "skipped", "loss": float("nan"), "samples": {
        "1": {"micro_batches": [1], "streams": [
            {"stream": "video", "packs": [{"epoch": 0, "pack": 5, "source": "",
                                           "samples": ["shard-000001.tar/img_00003-e840b824", "web#12"]}]},
            {"stream": "tokens", "global_samples": [46], "documents": [["/data/tok/web", 7], ["/data/tok/web", 9]]}]},
        "0": None}}
    f1 = _write(tmp_path / "nonfinite.jsonl", [json.dumps(record)])
    f2 = _write(tmp_path / "list.txt", ["// samples seen to spike", "", "shard-000002.tar/clip_00001-aa ",
                                       '{"sample": "shard-000002.tar/clip_00002-bb"}',
                                       '{"document": ["other", 3]}'])
    ex = read_exclude(f"{f1}, {f2}")
    assert ex.keys == {"shard-000001.tar/img_00003-e840b824", "web#12", "shard-000002.tar/clip_00001-aa",
                       "shard-000002.tar/clip_00002-bb"}
    assert ex.documents == {"web": {12}, "/data/tok/web": {7, 9}, "other": {3}}
    assert ex.documents_of("/data/tok/web") == {7, 9, 12} and ex.documents_of("/elsewhere/other") == {3}
    assert ex.keys_not_documents() == ex.keys - {"web#12"}
    assert len(ex) == 7 and ex.files == (f1, f2)
    assert not read_exclude("") and not read_exclude(_write(tmp_path / "empty.txt", ["// nothing"]))
    # a resumed launch of the run moved its records aside (train/metrics.py set_aside_redone): still named
    (tmp_path / "nonfinite.superseded.jsonl").write_text((tmp_path / "nonfinite.jsonl").read_text())
    (tmp_path / "nonfinite.jsonl").write_text("")
    assert read_exclude(f"{f1}, {f2}") == ex
    bad = {"gone": (str(tmp_path / "gone.txt"), r"data.exclude: .*gone.txt is not a file"),
           "json": (_write(tmp_path / "cut.jsonl", ['{"sample": "a/b"}', '{"step": 4, "sam']),
                    r"data.exclude: .*cut.jsonl line 2: not JSON .*a line cut short by a kill"),
           "shape": (_write(tmp_path / "shape.jsonl", ['{"key": "a/b"}']),
                     r"shape.jsonl line 1: a JSON line is a line of nonfinite.jsonl, .*got the keys \['key'\]"),
           "doc": (_write(tmp_path / "doc.jsonl", ['{"document": ["web", -1]}']),
                   r"doc.jsonl line 1: a document is \[<token file>, <number >= 0>\], got \['web', -1\]")}
    for path, message in bad.values():
        with pytest.raises(ExcludeError, match=message):
            read_exclude(path)


def test_the_start_up_line_counts_each_entry_once_under_what_it_names(tmp_path):
    """The launch's line `data.exclude: N sample(s) named in ... (K sample key(s), D token-file document(s))`
    counted a key `<file>#<n>` twice, as a key and as a document: 3 entries read "(2 sample key(s), 3 token-file
    document(s))". Each entry counts once: a `<file>#<n>` key as a document where the run reads token files, as a
    sample key where only the packed loader's keys can match it; a {"document": ...} line is a document, a
    `shard/key` line a sample key, either way. Worked counts: 4 entries, two of them `<file>#<n>` keys."""
    f = _write(tmp_path / "list.txt", ["web#3", "/data/tok/web#5", "shard-000002.tar/clip_00001-aa",
                                       '{"document": ["other", 3]}'])
    ex = read_exclude(f)
    assert ex.describe(token_documents=True) == (
        f"4 sample(s) named in {f} (1 sample key(s), 3 token-file document(s))")
    assert ex.describe(token_documents=False) == (
        f"4 sample(s) named in {f} (3 sample key(s), 1 token-file document(s))")


def test_a_line_not_utf8_is_named_with_its_file_and_line(tmp_path):
    """A list with a byte that is not UTF-8 stopped the launch with Python's bare "'utf-8' codec can't decode byte
    0xff in position 19", naming neither the file nor the line (docs/data.md: a line that is not a sample stops it,
    naming the file and line)."""
    path = tmp_path / "list.txt"
    path.write_bytes(b"shard-000000.tar/clip_00000-aa\n\xff\xfe\n")
    with pytest.raises(ExcludeError, match=rf"data.exclude: {path} line 2: not UTF-8 \(invalid start byte at byte 0\)"):
        read_exclude(str(path))


def _row_reference(plain: dict, gone: set[int], *, close_up: bool = False) -> dict:
    """The row `plain` with the tokens whose ids are in `gone` set to 0, and no loss on them or on a label among
    them (the row's S + 1 tokens are its tokens and its last label); close_up: those tokens moved to the row's end
    first, the others keeping their order."""
    full = torch.cat([plain["tokens"], plain["labels"][-1:]])
    blank = torch.isin(full, torch.tensor(sorted(gone)))
    if close_up:
        full, blank = torch.cat([full[~blank], full[blank]]), torch.sort(blank.int()).values.bool()
    full = torch.where(blank, torch.zeros_like(full), full)
    out = {**plain, "tokens": full[:-1], "labels": full[1:]}
    out["loss_mask"] = plain["loss_mask"] * ~(blank[:-1] | blank[1:])
    return out


@pytest.mark.parametrize("bounds", [True, False])
def test_token_documents_named_become_padding_without_loss_and_no_other_row_changes(tmp_path, bounds):
    ids = _documents_named_by_their_ids(tmp_path)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    named = {(a, 3), (a, 10), (b, 7), (b, 12)}
    lst = _write(tmp_path / "list.txt", ["a#3", f"{a}#10", "b#7", json.dumps({"document": [b, 12]}),
                                         "a#999", "c#1", "shard-000000.tar/clip"])
    gone = {t for t, d in ids.items() if d in named}
    kw = dict(seq_length=16, seed=3, weights=[1, 1])
    mbs = 1 if bounds else 2
    plain, left = (TokenFileStream(TokenCorpus(f"{a},{b}", **kw, exclude=ex), document_bounds=bounds,
                                   micro_batch_size=mbs, global_batch_size=4, dp_rank=0, dp_size=1)
                   for ex in (None, read_exclude(lst)))
    assert left.unmatched_exclusions == ["a#999", "c#1", "shard-000000.tar/clip"]
    assert plain.unmatched_exclusions == []
    met = moved = blanked = 0
    for _ in range(60):
        p, q = next(plain), next(left)
        assert p.keys() == q.keys()
        for r in range(mbs):
            # without document bounds the row's documents attend each other: the left-out ones' blanks move to
            # its end, where nothing attends them
            ref = _row_reference({k: v[r] for k, v in p.items() if k not in ("cu_seqlens", "doc_groups")}, gone,
                                 close_up=not bounds)
            for k in ref:
                assert torch.equal(q[k][r], ref[k]), k
            moved += not torch.equal(ref["tokens"], _row_reference({k: v[r] for k, v in p.items() if k != "doc_groups"},
                                                                   gone)["tokens"])
            # the left-out pieces this row held: one per named document whose id is among its S + 1 tokens
            met += len(set(p["tokens"][r].tolist() + p["labels"][r, -1:].tolist()) & gone)
        if bounds:
            assert torch.equal(q["cu_seqlens"], p["cu_seqlens"])
            # each segment's group: a text document's (2), -1 for a left-out one (padding to the routers' balancing
            # per document, train/trainer.token_documents), whose tokens are all its id
            cu = p["cu_seqlens"].tolist()
            want = [-1 if set(p["tokens"][0, lo:hi].tolist()) <= gone else 2 for lo, hi in zip(cu[:-1], cu[1:])]
            assert p["doc_groups"].tolist() == [2] * len(want) and q["doc_groups"].tolist() == want
            parts = torch.repeat_interleave(torch.arange(len(want)), p["cu_seqlens"].diff())
            docs = token_documents(parts, len(want), real_segments=None, doc_groups=q["doc_groups"])
            assert docs.tolist() == [-1 if want[i] < 0 else i for i in parts.tolist()]
            blanked += want.count(-1)
    assert met >= 4 and left.left_out_met == met
    assert blanked > 0 or not bounds
    assert (moved > 0) == (not bounds), moved   # some left-out piece had kept tokens after it in its row


def test_token_rows_in_the_video_mixture_leave_their_named_documents_out(tmp_path):
    """TokenPacks (data.video.text_tokens): the pack of a row names its documents by base name; a named one's
    tokens are padding with no label, and the pack lists it as excluded."""
    ids = _documents_named_by_their_ids(tmp_path)
    cfg = small_cfg(tmp_path, seq_len=48)
    spec = f"{tmp_path / 'a'},{tmp_path / 'b'}"
    plain, left = (TokenPacks(spec, cfg, ByteTokenizer(), 3) for _ in range(2))
    assert left.source.leave_out(read_exclude(_write(tmp_path / "x.txt", ["a#4", "b#2", "b#31"]))) == {"b#31"}
    gone = {t for t, d in ids.items() if d in {(str(tmp_path / "a"), 4), (str(tmp_path / "b"), 2)}}
    seen = []
    for j in range(plain.num_packs(0)):
        p, q = plain.build(0, j), left.build(0, j)
        ref = _row_reference({"tokens": p.tokens, "labels": torch.where(p.loss_mask > 0, p.labels, p.tokens.roll(-1)),
                              "loss_mask": p.loss_mask}, gone)
        assert torch.equal(q.tokens, ref["tokens"]) and torch.equal(q.loss_mask, ref["loss_mask"])
        assert torch.equal(q.labels, torch.where(ref["loss_mask"] > 0, ref["labels"],
                                                 torch.full_like(q.labels, cfg.label_ignore_index)))
        assert q.planned_keys == p.planned_keys and torch.equal(q.cu_seqlens, p.cu_seqlens)
        # the segments of the documents left out in place: group -1 (padding to the routers' balancing per document)
        groups = VideoBatchStream._doc_groups(SimpleNamespace(loader=SimpleNamespace(source_names=[""])), q).tolist()
        want = [-1 if key in q.excluded else 2 for key in q.sample_keys]
        assert groups[:len(want)] == want and set(groups[len(want):]) <= {-1}
        seen += q.excluded
        assert set(q.excluded) <= {"a#4", "b#2"}
        assert all(k in p.planned_keys for k in q.excluded)
    assert set(seen) == {"a#4", "b#2"}


def _cut(pack, d: int):
    """Pack `pack` (built without the list) with document d cut out and the freed length padded at the end: its
    tokens, labels, loss mask and positions, its frames' patches, grids and times."""
    cu = pack.cu_seqlens.tolist()
    lo, hi = cu[d], cu[d + 1]
    keep = torch.ones(pack.seq_len, dtype=torch.bool)
    keep[lo:hi] = False
    frames = pack.frame_doc != d
    rows = (pack.grid_thw[:, 0] * pack.grid_thw[:, 1] * pack.grid_thw[:, 2])
    patch_keep = torch.repeat_interleave(frames, rows)
    return {"tokens": pack.tokens[keep], "labels": pack.labels[keep], "loss_mask": pack.loss_mask[keep],
            "position_ids": pack.position_ids[:, keep], "pixel_values": pack.pixel_values[patch_keep],
            "grid_thw": pack.grid_thw[frames], "frame_timestamps": pack.frame_timestamps[frames]}


def test_a_video_pack_closes_up_a_named_sample_and_the_others_stay(shard_dir, tmp_path, caplog):
    cfg = small_cfg(shard_dir, tmp_path)
    plain = VideoPackedLoader(cfg, seed=11)
    packs = [next(plain) for _ in range(6)]
    many = [p for p in packs if p.num_docs >= 3]
    assert many, [p.num_docs for p in packs]
    target = many[0]
    key = target.sample_keys[1]
    typo = f"{key.split('/')[0]}/{key.split('/')[1][:-1]}"      # the key's shard, a sample it does not hold
    lst = _write(tmp_path / "x.txt", [key, "shard-999999.tar/none", "web#3", typo])
    left = VideoPackedLoader(small_cfg(shard_dir, tmp_path, num_workers=1), seed=11, exclude=read_exclude(lst))
    assert left.unmatched == sorted(["shard-999999.tar/none", "web#3", typo])
    with caplog.at_level("INFO", logger="data.video.loader"):
        got = [next(left) for _ in range(6)]
    left.close()
    assert (f"data.exclude: {key} left out of epoch {target.epoch} pack {target.pack_index}"
            in caplog.text), caplog.text[-2000:]
    for p, q in zip(packs, got):
        if p is not target:
            assert q.sample_keys == p.sample_keys and not q.excluded
            assert torch.equal(q.tokens, p.tokens) and torch.equal(q.pixel_values, p.pixel_values)
            continue
        assert q.excluded == [key] and q.sample_keys == [k for k in p.sample_keys if k != key]
        assert q.planned_keys == p.planned_keys and q.num_docs == p.num_docs - 1
        ref = _cut(p, 1)
        n = ref["tokens"].numel()
        assert q.num_pad == p.num_pad + p.seq_len - n
        for k in ("tokens", "labels", "loss_mask"):
            assert torch.equal(getattr(q, k)[:n], ref[k]), k
        assert not q.loss_mask[n:].any()
        assert torch.equal(q.position_ids[:, :n], ref["position_ids"])
        for k in ("pixel_values", "grid_thw", "frame_timestamps"):
            assert torch.equal(getattr(q, k), ref[k]), k
    assert left.stats["samples_excluded"] == 1
    assert left.stats["samples_ok"] == plain.stats["samples_ok"] - 1


def test_a_list_that_names_nothing_or_the_wrong_data_stops_the_launch(tmp_path):
    """The launcher reads the files before any process group exists (train/launch.check_paths); synthetic text
    names no samples."""
    from tests.unit.test_config import _validate
    from train.launch import check_paths

    tokens = ("recipe=keye_tiny_lm", "data=tokens_tiny", "train.micro_batch_size=1", f"run_dir={tmp_path / 'run'}")
    with pytest.raises(ValueError, match=r"data.exclude=.*x.txt.*: data.kind=synthetic_tokens draws its rows from a "
                                         r"Markov chain and names no samples"):
        _validate("recipe=keye_tiny_lm", f"data.exclude={tmp_path / 'x.txt'}")
    with pytest.raises(ValueError, match=r"data.exclude: .*gone.txt is not a file"):
        check_paths(_validate(*tokens, f"data.exclude={tmp_path / 'gone.txt'}")[0])
    # a synthetic run's record names global samples only: nothing to leave out
    rec = {"step": 3, "samples": {"1": {"micro_batches": None, "streams": [
        {"stream": "synthetic_tokens", "global_samples": [40, 41]}]}}}
    empty = _write(tmp_path / "nonfinite.jsonl", [json.dumps(rec)])
    with pytest.raises(ValueError, match=r"data.exclude=.*nonfinite.jsonl.*: the files name no sample"):
        check_paths(_validate(*tokens, f"data.exclude={empty}")[0])
    check_paths(_validate(*tokens, f"data.exclude={_write(tmp_path / 'ok.txt', ['a#1'])}")[0])
