"""launch/preview.py against the data path's own packs: a loader (or token-file stream) built here, apart from the
preview's, gives the reference. The text in each pack_<i>.md is the tokenizer's decode of the pack's ids segment by
segment, its [[...]] marks cover exactly the tokens whose labels carry loss, each frame PNG is the pack's pixels
(packing.unpatchify of the loader's pixel_values) exactly, and summary.json's numbers are counts of the pack tensors.
Everything runs in this process: no torchrun, no model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.preview import main, parse_args, preview

BLOCK = re.compile(r"^(`{3,})text\n(.*?)\n\1$", re.S | re.M)
DOC = re.compile(r"^#{2,3} (?:Document \d+: )?(?:Document )?`([^`]+)`", re.M)
MARKER = re.compile(r"\{\{(frame (\d+): .*?= (\d+) tokens)\}\}")
SUP = re.compile(r"\[\[(.*?)\]\]", re.S)


def blocks(md: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(md)]


def supervised_runs(tokens: list[int], loss_mask: torch.Tensor, bounds: list[int]) -> list[tuple[int, int]]:
    """Runs [a, b) of the tokens the model learns to predict (token i where position i - 1's label counts), inside
    each segment of `bounds`: the reference the [[...]] marks must cover."""
    runs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        i = a
        while i < b:
            if i > 0 and loss_mask[i - 1] > 0:
                j = i
                while j < b and loss_mask[j - 1] > 0:
                    j += 1
                runs.append((i, j))
                i = j
            else:
                i += 1
    return runs


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    """Videos with still scenes (slow and fast frames), images and text-only samples."""
    from data.video.synthetic import make_synthetic_shards

    out = tmp_path_factory.mktemp("preview_synth")
    return make_synthetic_shards(out, n_videos=4, seed=3, shard_size_mb=0.04, workers=1, n_text=3, n_images=3,
                                 n_image_sets=1, scenes=2)


def test_video_packs_as_the_loader_makes_them(tmp_path, mixed_shards):
    from PIL import Image

    from data.video.loader import VideoPackedLoader
    from data.video.packing import unpatchify
    from train.config import to_config
    from train.launch import compose_config

    overrides = ["recipe=keye_tiny", f"data.video.shards={mixed_shards}", "data.video.num_workers=0",
                 "data.video.fast_frame_ratio=0.3", "data.synthetic_images=0", f"run_dir={tmp_path / 'run'}"]
    out = tmp_path / "out"
    n = 3
    summary = preview(parse_args(overrides + ["--packs", str(n), "--out", str(out)]))
    # the reference: rank 0 of the run's 2 data-parallel ranks (cpu_ep2: EP 2 needs 2 ranks), from the run's seed
    cfg = to_config(compose_config(overrides))
    from dataclasses import replace

    v = replace(cfg.data.video, seq_len=cfg.train.seq_length, quarantine_path="")
    loader = VideoPackedLoader(v, dp_rank=0, dp_world=2, seed=cfg.data.seed)
    tok = loader.tokenizer
    packs = [next(loader) for _ in range(n)]
    loader.close()
    assert summary["dp_size"] == 2 and len(summary["packs"]) == n
    seen = {"image": 0, "text": 0, "fast": 0}
    for i, pack in enumerate(packs):
        md = (out / f"pack_{i}.md").read_text()
        tokens, mask = pack.tokens.tolist(), pack.loss_mask
        cu = pack.cu_seqlens.tolist()
        # summary.json: counts of the pack's tensors
        per_frame = (pack.grid_thw.prod(-1) // 4).tolist()
        first = np.concatenate([[0], np.cumsum(per_frame)[:-1]]).astype(int)
        image = [tokens[int(pack.visual_pos[q])] == tok.image_pad_id for q in first]
        pad = int((pack.tokens[cu[pack.num_docs]:] == tok.pad_id).sum())
        s = summary["packs"][i]
        assert (s["tokens"], s["supervised_tokens"], s["frames"], s["images"], s["documents"], s["padding"]) == (
            pack.tokens.numel(), int(mask.sum()), len(per_frame) - sum(image), sum(image), len(cu) - 1 - (pad > 0),
            pad), (i, s)
        assert json.loads((out / "summary.json").read_text())["packs"][i] == s
        # each document's block: its key, and with its marks and markers taken out, the decode of its ids
        assert DOC.findall(md) == pack.sample_keys
        texts = blocks(md)
        assert len(texts) == pack.num_docs
        marked = []
        for d, text in enumerate(texts):
            a, b = cu[d], cu[d + 1]

            def placeholders(m):
                pad_id = tok.image_pad_id if m.group(1).split(": ", 1)[1].startswith("image ") else tok.video_pad_id
                return tok.decode([pad_id] * int(m.group(3)))

            plain = MARKER.sub(placeholders, text).replace("[[", "").replace("]]", "")
            assert plain == tok.decode(tokens[a:b]), (i, d)
            marked += SUP.findall(MARKER.sub("", text))
            frames = [int(f) for f in pack.frame_doc.tolist()]
            markers = MARKER.findall(text)
            assert [int(f) for _, f, _ in markers] == [f for f in range(len(frames)) if frames[f] == d]
            for what, f, count in markers:
                f = int(f)
                assert int(count) == per_frame[f] and pack.sample_keys[d] in what
                if not image[f]:
                    assert f"{float(pack.frame_timestamps[f]):.2f}s" in what
                    seen["fast"] += ", fast," in what
                else:
                    seen["image"] += 1
            seen["text"] += not markers
        # the marks: exactly the runs of tokens whose labels carry loss, in order
        assert marked == [tok.decode(tokens[a:b]) for a, b in supervised_runs(tokens, mask, cu)], i
        # the frames: the loader's pixels, as the vision tower gets them
        frames = unpatchify(pack.pixel_values, pack.grid_thw, v.patch_size, v.merge_size)
        assert len(frames) == len(list(out.glob(f"pack_{i}_frame_*.png")))
        for k, want in enumerate(frames):
            got = np.asarray(Image.open(out / f"pack_{i}_frame_{k}.png").convert("RGB"))
            assert np.array_equal(got, want), (i, k)
            assert f"](pack_{i}_frame_{k}.png)" in md
    assert seen["fast"] == sum(p.fast_frames for p in packs)
    assert all(seen.values()), f"the packs shown must hold an image, a text and a fast frame: {seen}"


@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    """Two token files of the byte tokenizer (a sidecar naming it): training documents and held-out ones."""
    from data.token_files import write_token_files
    from data.video.tokenizer import ByteTokenizer

    tok = ByteTokenizer(vocab_size=512)
    d = tmp_path_factory.mktemp("preview_tokens")
    texts = {name: [f"{name} document {i}: " + "la " * (3 + 7 * i % 40) for i in range(40)]
             for name in ("train", "held")}
    for name, docs in texts.items():
        write_token_files([tok.encode(t) + [tok.eos_id] for t in docs], d / name, vocab_size=512,
                          meta={"tokenizer": repr(tok), "eos_id": tok.eos_id})
    return d, texts, tok


@pytest.mark.parametrize("split", ["train", "eval"])
def test_token_rows_as_the_stream_makes_them(tmp_path, token_files, split):
    """Token files: the rows of data-parallel rank 1, decoded with the tokenizer the sidecar names, each document
    piece under its file and number (the text at its offset in that document); the held-out set with --split eval."""
    from data.token_files import TokenCorpus, TokenFileStream
    from train.config import to_config
    from train.launch import compose_config

    d, texts, tok = token_files
    overrides = ["recipe=keye_tiny_lm", "data=tokens", f"data.tokens.paths={d / 'train'}",
                 f"data.tokens.eval_paths={d / 'held'}", "train.micro_batch_size=1", "train.seq_length=96",
                 f"run_dir={tmp_path / 'run'}"]
    out = tmp_path / "out"
    n = 3
    summary = preview(parse_args(overrides + ["--packs", str(n), "--out", str(out), "--dp-rank", "1",
                                              "--split", split]))
    name = "train" if split == "train" else "held"
    cfg = to_config(compose_config(overrides))
    corpus = TokenCorpus(str(d / name), seq_length=96, seed=cfg.data.seed)
    stream = TokenFileStream(corpus, document_bounds=True, micro_batch_size=1,
                             global_batch_size=cfg.train.global_batch_size, dp_rank=1, dp_size=2)
    for i in range(n):
        row = next(stream)
        tokens, mask, cu = row["tokens"][0].tolist(), row["loss_mask"][0], row["cu_seqlens"].tolist()
        md = (out / f"pack_{i}.md").read_text()
        s = summary["packs"][i]
        assert (s["tokens"], s["supervised_tokens"], s["documents"]) == (96, int(mask.sum()), len(cu) - 1)
        texts_md = blocks(md)
        names = DOC.findall(md)
        assert len(texts_md) == len(names) == len(cu) - 1
        sections = md.split("### Document ")[1:]
        for (a, b), text, doc, section in zip(zip(cu[:-1], cu[1:]), texts_md, names, sections):
            assert text.replace("[[", "").replace("]]", "") == tok.decode(tokens[a:b])
            file, number = doc.split("#")
            assert file == name
            whole = tok.decode(tok.encode(texts[name][int(number)]) + [tok.eos_id])
            assert tok.decode(tokens[a:b]) in whole
            # a document the row holds only in part is named a cut (the row's last label may hold its last token)
            held = {tok.decode(tokens[a:b])} | ({tok.decode(tokens[a:b] + [int(row["labels"][0, -1])])} if b == 96
                                                else set())
            assert ("\nCut: " in section) == (whole not in held), (i, doc, section)
        marked = [m for text in texts_md for m in SUP.findall(text)]
        assert marked == [tok.decode(tokens[a:b]) for a, b in supervised_runs(tokens, mask, cu)], i
        # the last label, the token after the row: marked when it carries loss
        last = tok.decode([int(row["labels"][0, -1])])
        assert (f"`[[{last}]]`" if mask[-1] > 0 else f"`{last}`") in md


def test_wrong_inputs_stop_with_their_names(tmp_path, mixed_shards, capsys):
    """A wrong key, missing data, no held-out set, and a tokenizer that cannot decode the rows: exit 2 with the
    input named, before anything is written (the tokenizer's: once the rows are read, with their ids)."""
    from data.token_files import write_token_files
    from data.video.synthetic import make_synthetic_hf_tokenizer

    out = tmp_path / "out"
    cases = [(["recipe=keye_tiny", "data.video.shardz=/x"], "config error: ", "shardz"),
             (["recipe=keye_tiny", "train.lr=fast"], "config error: ", "train.lr"),
             (["recipe=keye_30b_a3b"], "config error: ", "data.video.shards is required"),
             (["recipe=keye_tiny", f"data.video.shards={mixed_shards}", "--split", "eval"], "config error: ",
              "--split eval: this run has no held-out data: data.video.eval_shards is empty"),
             (["recipe=keye_tiny", "--dp-rank", "2"], "config error: ", "--dp-rank 2: the run has 2 data-parallel"),
             (["recipe=keye_tiny", f"data.video.shards={mixed_shards}", "--tokenizer", "bytes"], "preview error: ",
              "--tokenizer bytes: video packs are tokenized with data.video.tokenizer (bytes)")]
    for argv, prefix, needle in cases:
        with pytest.raises(SystemExit) as stop:
            main(argv + [f"run_dir={tmp_path / 'run'}", "--out", str(out)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(prefix) and needle in err, (argv, err)
        assert not out.exists(), argv
    # ids beyond the tokenizer's vocabulary (409 ids): named with the tokenizer, the rows' ids shown
    d = tmp_path / "wide"
    write_token_files([[5, 480, 6] * 50], d / "ids", vocab_size=512)
    hf = make_synthetic_hf_tokenizer(tmp_path / "tok")
    with pytest.raises(SystemExit) as stop:
        main(["recipe=keye_tiny_lm", "data=tokens", f"data.tokens.paths={d / 'ids'}", "train.micro_batch_size=1",
              "train.seq_length=64", f"run_dir={tmp_path / 'run'}", "--tokenizer", str(hf), "--out", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("preview error: the tokenizer HFTokenizer("), err
    assert "cannot decode" in err and "id 480 outside its vocabulary (0..408)" in err and "[5, 480, 6, 5" in err, err
    # those files name no tokenizer: without --tokenizer the preview says so, before it writes anything
    with pytest.raises(SystemExit) as stop:
        main(["recipe=keye_tiny_lm", "data=tokens", f"data.tokens.paths={d / 'ids'}", "train.micro_batch_size=1",
              "train.seq_length=64", f"run_dir={tmp_path / 'run'}", "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("preview error: no tokenizer known for the token files"), err
    assert "--tokenizer" in err and not (tmp_path / "out2").exists()


def test_row_pieces_are_the_documents_tokens(token_files):
    """TokenCorpus.pieces, which names a row's documents and cuts: each piece is its document's tokens from its
    offset, and the pieces together are the row's seq_length + 1 tokens."""
    from data.token_files import TokenCorpus

    d, texts, tok = token_files
    corpus = TokenCorpus(str(d / "train"), seq_length=96, seed=5)
    docs = [tok.encode(t) + [tok.eos_id] for t in texts["train"]]
    for j in range(12):
        got = []
        for prefix, n, offset, count, length, left_out in corpus.pieces(j):
            assert Path(prefix).name == "train" and length == len(docs[n]) and not left_out
            got += docs[n][offset:offset + count]
        assert got == corpus.sources[0].sample(j)[0].tolist(), j


def test_synthetic_text_is_shown_as_its_ids(tmp_path):
    """data.kind=synthetic_tokens (keye_tiny_lm): a Markov chain of ids that no tokenizer wrote, shown as the ids of the
    stream's rows, every token but a row's first trained."""
    from data.synthetic_tokens import SyntheticTokenStream
    from train.config import to_config
    from train.launch import compose_config

    overrides = ["recipe=keye_tiny_lm", f"run_dir={tmp_path / 'run'}"]
    summary = preview(parse_args(overrides + ["--packs", "1", "--out", str(tmp_path / "out")]))
    cfg = to_config(compose_config(overrides))
    mb = next(SyntheticTokenStream(cfg.data, vocab_size=cfg.model.lm.vocab_size, seq_length=cfg.train.seq_length,
                                   micro_batch_size=cfg.train.micro_batch_size,
                                   global_batch_size=cfg.train.global_batch_size, dp_rank=0, dp_size=2))
    texts = blocks((tmp_path / "out" / "pack_0.md").read_text())
    assert len(texts) == mb["tokens"].shape[0]
    for r, text in enumerate(texts):
        ids = mb["tokens"][r].tolist()
        assert text == f"{ids[0]} [[" + " ".join(map(str, ids[1:])) + "]]"
    assert summary["packs"][0]["supervised_tokens"] == int(mb["loss_mask"].sum())


@pytest.mark.parametrize("tokenizer", ["bytes", "hf"])
def test_a_spelled_special_token_does_not_read_as_the_token(tmp_path, tokenizer):
    """A document whose answer spells "<|im_end|>" (and "<|endoftext|>", the byte tokenizer's "<eos>"): the preview
    showed the spelling exactly as the template's turn end and the document's end, so a reader could not tell text
    the model reads as characters from a control token. The spellings are shown with a backslash before them, the
    tokens as they are; the text otherwise is the tokenizer's decode (written out here from the pieces)."""
    from data.video.synthetic import make_synthetic_hf_tokenizer
    from data.video.tokenizer import ByteTokenizer, HFTokenizer
    from launch.preview import Decoder, render_text

    tok = ByteTokenizer() if tokenizer == "bytes" else HFTokenizer(make_synthetic_hf_tokenizer(tmp_path / "hf"))
    end = "<eos>" if tokenizer == "bytes" else "<|endoftext|>"
    turn = [] if tokenizer == "bytes" else [tok.token_id("<|im_end|>")]   # the byte tokenizer has no turn token
    answer = f"Qwen ends a turn with <|im_end|> and a document with {end}."
    ids = tok.encode("Q: how?\n") + tok.encode(answer) + turn + [tok.eos_id]
    targets = [False] * len(tok.encode("Q: how?\n")) + [True] * (len(ids) - len(tok.encode("Q: how?\n")))
    shown = render_text(ids, targets, Decoder(tok, repr(tok)), "a document")
    real = ("<|im_end|>" if turn else "") + end
    assert shown == f"Q: how?\n[[Qwen ends a turn with \\<|im_end|> and a document with \\{end}.{real}]]", shown


def test_a_batch_ramp_shows_each_steps_own_slice(tmp_path):
    """train.batch_rampup: step 1 takes a global batch of 8 sequences, step 2 (8 consumed) the full 16. Data-parallel
    rank 1 of 2 reads, by data/sample_position.py's rule (rank r of R takes [c + r G / R, c + (r + 1) G / R) of the
    step's G after c consumed), samples 4..7 in step 1 and 16..23 in step 2: the preview names them and shows their
    ids (reference: the synthetic source's samples by index). It showed the slices of a 16-sequence step 1 (8..15)."""
    from data.synthetic_tokens import SyntheticTokenSource
    from train.config import to_config
    from train.launch import compose_config

    overrides = ["recipe=keye_tiny_lm", f"run_dir={tmp_path / 'run'}", "train.batch_rampup.start=8",
                 "train.batch_rampup.increment=8", "train.batch_rampup.samples=8"]
    summary = preview(parse_args(overrides + ["--packs", "3", "--dp-rank", "1", "--out", str(tmp_path / "out")]))
    cfg = to_config(compose_config(overrides))
    source = SyntheticTokenSource(cfg.data, vocab_size=cfg.model.lm.vocab_size, seq_length=cfg.train.seq_length)
    expected = [(1, 0, [4, 5, 6, 7]), (2, 0, [16, 17, 18, 19]), (2, 1, [20, 21, 22, 23])]
    for i, (step, micro, samples) in enumerate(expected):
        md = (tmp_path / "out" / f"pack_{i}.md").read_text()
        assert f"# Micro-batch {i}: step {step}, micro-batch {micro}" in md
        assert f"global samples {', '.join(map(str, samples))};" in md
        ids = [source.sample(j)[:-1].tolist() for j in samples]
        assert blocks(md) == [f"{r[0]} [[" + " ".join(map(str, r[1:])) + "]]" for r in ids]
    assert summary["micro_batches_per_step"] == 16 // (4 * 2)   # train.global_batch_size's
