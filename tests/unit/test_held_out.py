"""Named held-out sets (data/held_out.py): how `data.tokens.eval_paths` and `data.video.eval_shards` are split into
sets, and the launcher's checks of each set before a run starts. The sets' scores through the trainer are tested in
tests/dist/test_token_files_train.py and tests/dist/test_eval.py (each set against a run on it alone)."""
import pytest

from data.held_out import held_out_paths, held_out_sets


@pytest.mark.parametrize("spec, sets", [
    ("", [("", "")]),
    ("/data/val", [("", "/data/val")]),
    ("/a, /b", [("", "/a,/b")]),                                   # one pool, as before names existed
    ("web=/data/web, code=/data/code", [("web", "/data/web"), ("code", "/data/code")]),
    ("a=/x,b=/z,a=/y", [("a", "/x,/y"), ("b", "/z")]),            # a name twice: one set, in the order first named
    ("/data/date=2024/val", [("", "/data/date=2024/val")]),        # a '=' after a '/' is part of a path
    ("./date=2024,/b", [("", "./date=2024,/b")]),
    ("v1.2_x-y=/p", [("v1.2_x-y", "/p")]),
])
def test_sets_of_a_spec(spec, sets):
    assert held_out_sets(spec, field_name="f") == sets
    assert held_out_paths(spec, field_name="f") == ",".join(p for _, p in sets if p)


@pytest.mark.parametrize("spec, message", [
    ("web=/a,/b", r"^f='web=/a,/b': '/b' has no name but other parts have one: name every held-out set"),
    ("/b,web=/a", r"'/b' has no name"),
    ("web=", r"^f='web=': held-out set 'web' names no path \(NAME=PATH\)"),
])
def test_a_half_named_spec_is_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        held_out_sets(spec, field_name="f")


def test_the_launcher_checks_each_named_set(tmp_path, monkeypatch):
    """check_paths: a named video set without shards names the set; a named set that holds training shards, or
    training token files, is refused as training data; a half-named list stops the launch; named sets that are
    there pass."""
    from data.token_files import write_token_files
    from train.launch import check_paths, compose_config, validate

    monkeypatch.setenv("WORLD_SIZE", "1")

    def cfg(*overrides):
        return validate(compose_config([f"run_dir={tmp_path / 'run'}", "parallel=single", *overrides]))[0]

    for d in ("train", "val1", "val2", "empty"):
        (tmp_path / d).mkdir()
    for d in ("train", "val1", "val2"):
        (tmp_path / d / "shard-000000.tar").write_bytes(b"")
    video = ("recipe=keye_tiny", f"data.video.shards={tmp_path / 'train'}")
    check_paths(cfg(*video, f"data.video.eval_shards='a={tmp_path / 'val1'},b={tmp_path / 'val2'}'"))
    with pytest.raises(ValueError, match=r"^data\.video\.eval_shards='a=.*' \(held-out set 'b': '.*empty'\): no \.tar "
                                         r"shards there"):
        check_paths(cfg(*video, f"data.video.eval_shards='a={tmp_path / 'val1'},b={tmp_path / 'empty'}'"))
    with pytest.raises(ValueError, match=r"data\.video\.eval_shards=.*: 1 shard file\(s\) are also training data"):
        check_paths(cfg(*video, f"data.video.eval_shards='a={tmp_path / 'val1'},b={tmp_path / 'train'}'"))
    with pytest.raises(ValueError, match=r"has no name but other parts have one"):
        check_paths(cfg(*video, f"data.video.eval_shards='a={tmp_path / 'val1'},{tmp_path / 'val2'}'"))

    for name in ("a", "b", "c"):   # one row of the tiny recipe's train.seq_length + 1 = 257 tokens each
        write_token_files([list(range(1, 258))], tmp_path / name, vocab_size=512)
    lm = ("recipe=keye_tiny_lm", "data=tokens", "train.micro_batch_size=1", f"data.tokens.paths={tmp_path / 'a'}")
    check_paths(cfg(*lm, f"data.tokens.eval_paths='b={tmp_path / 'b'},c={tmp_path / 'c'}'"))
    with pytest.raises(ValueError, match=r"data\.tokens\.eval_paths=.*a is also training data"):
        check_paths(cfg(*lm, f"data.tokens.eval_paths='b={tmp_path / 'b'},c={tmp_path / 'a'}'"))
    with pytest.raises(ValueError, match=r"^data\.tokens\.eval_paths=.*: .*missing\.bin and .*missing\.idx do not exist"):
        check_paths(cfg(*lm, f"data.tokens.eval_paths='b={tmp_path / 'b'},c={tmp_path / 'missing'}'"))


def test_token_files_too_short_for_one_row_stop_the_launch(tmp_path, monkeypatch):
    """A held-out set of token files (or a training source) that holds fewer than train.seq_length + 1 tokens has no
    row: the launcher names the setting, the set and the counts before any process group exists. Before, the run
    built its model, trained up to its first evaluation (train.eval.interval steps after a resume) and stopped there
    with a traceback naming only the file. One token more than a row's worth passes."""
    from data.token_files import write_token_files
    from train.launch import check_paths, compose_config, validate

    monkeypatch.setenv("WORLD_SIZE", "1")

    def cfg(*overrides):
        return validate(compose_config([f"run_dir={tmp_path / 'run'}", "parallel=single", "recipe=keye_tiny_lm",
                                        "data=tokens", "train.micro_batch_size=1", "train.seq_length=128",
                                        "train.eval.interval=5", *overrides]))[0]

    # a row is train.seq_length + 1 = 129 tokens: "row" holds one (two documents), "short" one token fewer
    write_token_files([list(range(1, 101)), list(range(1, 30))], tmp_path / "row", vocab_size=512)
    for name in ("short", "short2"):
        write_token_files([list(range(1, 101)), list(range(1, 29))], tmp_path / name, vocab_size=512)
    write_token_files([list(range(1, 301))], tmp_path / "train", vocab_size=512)
    train = f"data.tokens.paths={tmp_path / 'train'}"
    check_paths(cfg(train, f"data.tokens.eval_paths={tmp_path / 'row'}"))
    with pytest.raises(ValueError, match=r"^data\.tokens\.eval_paths='.*short': .*short holds 128 tokens in 2 "
                                         r"documents, fewer than one row of train\.seq_length \+ 1 = 129 tokens$"):
        check_paths(cfg(train, f"data.tokens.eval_paths={tmp_path / 'short'}"))
    with pytest.raises(ValueError, match=r"^data\.tokens\.eval_paths='a=.*': held-out set 'b' \(.*short\) holds 128 "
                                         r"tokens in 2 documents, fewer than one row"):
        check_paths(cfg(train, f"data.tokens.eval_paths='a={tmp_path / 'row'},b={tmp_path / 'short'}'"))
    # the files of a set are one pool: two short ones together fill a row
    check_paths(cfg(train, f"data.tokens.eval_paths='a={tmp_path / 'short'},a={tmp_path / 'short2'}'"))
    # training paths: one pool without weights, each weighted path its own source (a weight of 0 reads nothing)
    check_paths(cfg(f"data.tokens.paths='{tmp_path / 'short'},{tmp_path / 'row'}'",
                    f"data.tokens.eval_paths={tmp_path / 'train'}"))
    with pytest.raises(ValueError, match=r"^data\.tokens\.paths='.*': .*short holds 128 tokens in 2 documents"):
        check_paths(cfg(f"data.tokens.paths='{tmp_path / 'short'},{tmp_path / 'row'}'", "data.tokens.weights=[1,1]",
                        f"data.tokens.eval_paths={tmp_path / 'train'}"))
    check_paths(cfg(f"data.tokens.paths='{tmp_path / 'short'},{tmp_path / 'row'}'", "data.tokens.weights=[0,1]",
                    f"data.tokens.eval_paths={tmp_path / 'train'}"))


def test_set_batches_give_a_named_set_its_own_count(tmp_path, monkeypatch):
    """train.eval.set_batches: a named set's own number of global batches, the others train.eval.batches; a name
    that is not a held-out set of the run (a typo, one unnamed pool, synthetic text) or a count below 1 stops the
    run before it starts, naming the setting and the sets there are."""
    from data.held_out import eval_plan
    from train.launch import compose_config, validate

    monkeypatch.setenv("WORLD_SIZE", "1")

    def plan(*overrides):
        cfg = validate(compose_config([f"run_dir={tmp_path / 'run'}", "parallel=single", *overrides]))[0]
        return eval_plan(cfg.data, cfg.train.eval.batches, cfg.train.eval.set_batches)

    video = ("recipe=keye_tiny", "data.video.eval_shards='clips=/v/a,qa=/v/b,long=/v/c'", "train.eval.batches=2")
    assert plan(*video, "train.eval.set_batches='qa=5'") == [("clips", "/v/a", 2), ("qa", "/v/b", 5), ("long", "/v/c", 2)]
    assert plan(*video, "train.eval.set_batches='long=1, clips=3'") == [("clips", "/v/a", 3), ("qa", "/v/b", 2),
                                                                        ("long", "/v/c", 1)]
    with pytest.raises(ValueError, match=r"^train\.eval\.set_batches names 'q', not a held-out set of this run: "
                                         r"data\.video\.eval_shards='clips=/v/a,qa=/v/b,long=/v/c' names the sets "
                                         r"clips, qa, long$"):
        plan(*video, "train.eval.set_batches='q=5'")
    with pytest.raises(ValueError, match=r"set_batches names 'qa', .*data\.video\.eval_shards='/v/a' names no set"):
        plan("recipe=keye_tiny", "data.video.eval_shards=/v/a", "train.eval.set_batches='qa=5'")
    with pytest.raises(ValueError, match=r"set_batches names 'qa', .*synthetic text has one held-out set"):
        plan("recipe=keye_tiny_lm", "train.eval.set_batches='qa=5'")
    for bad in ("qa=0", "qa", "qa=x", "=3", "qa=2,", "qa=All"):
        with pytest.raises(ValueError, match=rf"^train\.eval\.set_batches='{bad}': '.*' is not NAME=N or NAME=all "
                                             rf"\(a held-out set's name and its number of global batches, >= 1, or "
                                             rf"all: the whole set once\)$"):
            plan(*video, f"train.eval.set_batches='{bad}'")
    with pytest.raises(ValueError, match=r"^train\.eval\.set_batches='qa=1,qa=2': set 'qa' is given twice$"):
        plan(*video, "train.eval.set_batches='qa=1,qa=2'")
    assert plan("recipe=keye_tiny_lm", "train.eval.batches=3") == [("", "", 3)]


def test_a_set_is_scored_whole_by_batches_0_or_all(tmp_path, monkeypatch):
    """train.eval.batches=0, or set_batches NAME=all: the set whole, once (WHOLE); for synthetic text, a generator
    without an end, the run stops before it starts, naming the setting; a negative count stops it too."""
    from data.held_out import WHOLE, eval_plan
    from train.launch import compose_config, validate

    monkeypatch.setenv("WORLD_SIZE", "1")

    def plan(*overrides):
        cfg = validate(compose_config([f"run_dir={tmp_path / 'run'}", "parallel=single", *overrides]))[0]
        return eval_plan(cfg.data, cfg.train.eval.batches, cfg.train.eval.set_batches)

    video = ("recipe=keye_tiny", "data.video.eval_shards='clips=/v/a,qa=/v/b'")
    assert WHOLE == 0
    assert plan(*video, "train.eval.set_batches='qa=all'") == [("clips", "/v/a", 1), ("qa", "/v/b", WHOLE)]
    assert plan(*video, "train.eval.batches=0", "train.eval.set_batches='clips=2'") == [("clips", "/v/a", 2),
                                                                                        ("qa", "/v/b", WHOLE)]
    assert plan("recipe=keye_tiny", "train.eval.batches=0") == [("", "", WHOLE)]  # its own synthetic held-out videos
    with pytest.raises(ValueError, match=r"^train\.eval\.batches=0 asks for the whole held-out set, once, but "
                                         r"synthetic text \(data\.kind=synthetic_tokens\) is a generator without an end"):
        plan("recipe=keye_tiny_lm", "train.eval.batches=0")
    with pytest.raises(ValueError, match=r"train\.eval\.batches must be >= 1, or 0 for each held-out set whole, "
                                         r"once; got -1"):
        plan("recipe=keye_tiny_lm", "train.eval.batches=-1")


def _texts_in_shards(shard_dir) -> dict[str, str]:
    """The text-only samples a shard directory holds, read back from its tar members: content -> sample key."""
    import json
    import tarfile

    out = {}
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    rec = json.load(tf.extractfile(m))
                    if rec["kind"] == "text":
                        a = rec["annotation"]
                        out[json.dumps({k: a.get(k) for k in ("prompt", "qa", "text")}, sort_keys=True)] = rec["key"]
    return out


def test_synthetic_held_out_sets_hold_no_training_sample(tmp_path):
    """The held-out sets a run makes for itself, as the trainer makes them for the tiny recipes (train/trainer.py:
    data=text_tiny's 100 text-only samples under seed + 1 beside its 400 under the seed, data=tokens_tiny's 500
    documents beside its 2,000), read back from what was written (the shards' tar members; the token files through
    megatron's reader): no sample or document is on both sides, and each set has its size. Before, one text-only
    sample ("What is 39 plus 7?") and one token document ("What is 21 plus 47?") were in both: the questions of two
    seeds coincide now and then."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data.token_files import ensure_synthetic_token_files
    from data.video_stream import ensure_synthetic_shards

    seed = 1234   # text_tiny's and tokens_tiny's data.seed
    train = _texts_in_shards(ensure_synthetic_shards(tmp_path / "train", 0, seed, rank=0, n_text=400))
    held = _texts_in_shards(ensure_synthetic_shards(tmp_path / "held", 0, seed + 1, rank=0, n_text=100,
                                                    text_held_out_from=(seed, 400)))
    # ingest drops a record equal to one before it in the same file: 3 of the training set's 400 repeat one
    assert len(train) == 397 and len(held) == 100
    assert not set(train) & set(held), [train[k] for k in set(train) & set(held)]

    def documents(prefix) -> set[bytes]:
        ds = IndexedDataset(prefix, mmap=True)
        return {ds[i].tobytes() for i in range(len(ds))}

    train_docs = documents(ensure_synthetic_token_files(tmp_path / "tok", 2000, seed, rank=0, vocab_size=512))
    held_docs = documents(ensure_synthetic_token_files(tmp_path / "tok", 500, seed + 1, rank=0, vocab_size=512,
                                                       held_out_from=(seed, 2000)))
    assert len(held_docs) == 500 and not train_docs & held_docs


def test_a_resume_at_another_global_batch_size_names_the_held_out_sequences_it_moves():
    """Each evaluation scores train.eval.batches global batches from a held-out set's start, "so every evaluation
    scores the same sequences" (EvalConfig): a resume at another train.global_batch_size scores other ones, which
    the trainer's warning (held_out_moved) names with the count that keeps them; counts by hand. (Before, val_loss
    moved at a batch-size ramp with no word of it: 4 x 16 = 64 sequences, then 4 x 32 = 128.)"""
    from dataclasses import asdict

    from train.config import EvalConfig, TrainConfig, held_out_moved

    def cfg(gbs, batches=4, interval=10, set_batches=""):
        return TrainConfig(global_batch_size=gbs, eval=EvalConfig(interval=interval, batches=batches,
                                                                  set_batches=set_batches))

    saved = asdict(cfg(16))
    assert held_out_moved(saved, cfg(32)) == (
        "train.global_batch_size 16 -> 32: each evaluation scores the first 128 sequences of each held-out set "
        "(train.eval.batches=4) where it scored 64, so val_loss from here on is over other sequences than before; "
        "train.eval.batches=2 scores those")
    assert held_out_moved(saved, cfg(24)).endswith("where it scored 64, so val_loss from here on is over other "
                                                   "sequences than before")      # 64 is no multiple of 24
    assert held_out_moved(saved, cfg(32, set_batches="web=2")).endswith(
        "(the sets train.eval.set_batches names count in global batches too)")
    assert held_out_moved(saved, cfg(32, batches=2)) == ""      # the same 64 sequences
    assert held_out_moved(saved, cfg(16)) == ""
    assert held_out_moved(saved, cfg(32, interval=0)) == ""     # no evaluation
    assert held_out_moved(asdict(cfg(16, batches=0)), cfg(32, batches=0)) == ""   # each set whole: the same set
