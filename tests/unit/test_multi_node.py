"""A multi-node run needs one run directory that every node sees (train/checkpoint.check_shared_run_dir), and the same
data on every node. With run_dir on each node's own disk (the same path, another directory on every node) a save
"committed" on rank 0's node a checkpoint whose other ranks' shards lay in `step_N.partial` on their own nodes; the
resume then stopped on rank 0's node ("every checkpoint ... is damaged: ... missing file .../__1_0.distcp") while the
other nodes, seeing no checkpoint, started afresh and waited in their first collective until killed (two torchrun ranks,
rank 1 in another working directory with run_dir=runs/x: hung until the 300 s timeout). The launch now stops at its
start, naming the ranks and hosts that do not see rank 0's directory.

Likewise the training data (train/data_streams.check_same_data): data-parallel ranks split one plan of the
samples, each planning it from its own view of the shards; a node whose copy of the shards lacked one (on its own disk)
trained on another plan without a word (two torchrun ranks, rank 1's copy lacking one shard: 57 samples against 60, 3
steps trained).

In one process (a gloo world of one rank): rank 1 of a world of two is stood in for by the collectives, whose gather
adds what rank 1 reads through its own view of the paths, running the same read."""

import datetime
import os
import re
import socket
import types

import pytest
import torch.distributed as dist

from train import checkpoint as ckpt
from train.config import SettingsError


def two_ranks(monkeypatch, view, run_dir_1=None):
    """train/checkpoint's collectives as in a world of two whose rank 1 (on host node-b) sees path p as view(p) and
    was given run_dir=`run_dir_1` (None: rank 0's)."""
    sent = {}

    def broadcast_object_list(objs, src=0, group=None):
        dist.broadcast_object_list(objs, src=src, group=group)
        sent["token"], sent["dirs"] = objs[0], objs[1]

    def all_gather_object(out, obj, group=None):
        mine = [None]
        dist.all_gather_object(mine, obj, group=group)
        own = [ckpt.Path(d) for d in sent["dirs"]]
        if run_dir_1 is not None:
            own = [ckpt.Path(run_dir_1), ckpt.checkpoint_root(run_dir_1)][:len(own)]
        out[:] = [mine[0], ("node-b", str(own[0].absolute()),
                            ckpt._probe_view([view(d) for d in own], sent["token"], wait_s=0.0))]

    fake = types.SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda: 2,
                                 broadcast_object_list=broadcast_object_list, all_gather_object=all_gather_object)
    monkeypatch.setattr(ckpt, "dist", fake)


@pytest.fixture
def world(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


def test_a_run_dir_every_rank_sees_passes_and_keeps_no_probe(tmp_path, world, monkeypatch):
    run = tmp_path / "run"
    two_ranks(monkeypatch, lambda p: p)
    assert ckpt.check_shared_run_dir(run, checkpoints=True) == [socket.gethostname(), "node-b"]   # each rank's host
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"] and not any((run / "checkpoints").iterdir())


def test_a_run_dir_on_each_node_s_own_disk_stops_naming_the_ranks_and_hosts(tmp_path, world, monkeypatch):
    run, node_b = tmp_path / "run", tmp_path / "node_b"   # rank 0's view, and rank 1's own disk at the same path
    two_ranks(monkeypatch, lambda p: node_b / p.relative_to(tmp_path))
    want = (rf"^run_dir={run} \({run}\) is not the same directory on every rank: rank 0 \(host "
            rf"{socket.gethostname()}\) wrote \.shared_probe\.\w+ there and rank 1 \(host node-b\) does not see it "
            rf"\(no such file\).*give run_dir=")
    with pytest.raises(SettingsError, match=want):
        ckpt.check_shared_run_dir(run, checkpoints=True)
    assert not [p for p in run.iterdir() if p.name.startswith(ckpt.PROBE_PREFIX)]   # removed all the same


def test_ranks_given_other_run_dirs_stop_naming_the_rank_and_its_run_dir(tmp_path, world, monkeypatch):
    """run_dir='/x/n_${now:%H%M%S_%f}' resolves on each rank as it starts: two ranks got two directories, and each
    saved its shards into its own; rank 0 "committed" a checkpoint whose COMPLETE.json listed rank 1's files, and
    the resume found every checkpoint damaged. The check looked for the probe at rank 0's path on every rank, which
    each saw. Now each rank looks through its own run_dir. Reference: rank 1 given rank 0's run_dir passes."""
    run, other = tmp_path / "n_211500_1", tmp_path / "n_211500_2"
    two_ranks(monkeypatch, lambda p: p, run_dir_1=other)
    want = (rf"^run_dir={run} \({run}\) is not the run directory of every rank: rank 1 \(host node-b\) was given "
            rf"run_dir={other}, which does not hold rank 0's probe file \.shared_probe\.\w+ \(no such file\)\. "
            rf".*give every rank the same run_dir \(one that resolves per rank, such as \$\{{now:\.\.\.\}}")
    with pytest.raises(SettingsError, match=want):
        ckpt.check_shared_run_dir(run, checkpoints=True)
    two_ranks(monkeypatch, lambda p: p, run_dir_1=run)
    ckpt.check_shared_run_dir(run, checkpoints=True)
    # a relative run_dir on a node started in another working directory: its own view of the shared path is named
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    two_ranks(monkeypatch, lambda p: p, run_dir_1=tmp_path / "elsewhere" / "runs" / "x")
    with pytest.raises(SettingsError, match=rf"rank 1 \(host node-b\) was given run_dir={tmp_path}/elsewhere/runs/x"):
        ckpt.check_shared_run_dir("runs/x", checkpoints=True)


def test_a_checkpoint_directory_linked_to_a_node_s_own_disk_is_named(tmp_path, world, monkeypatch):
    """run_dir shared, its checkpoints/ a link to node-local scratch: the link is followed on each node."""
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(tmp_path / "scratch_a", run / "checkpoints")
    (tmp_path / "scratch_a").mkdir()

    def view(p):   # on node b the link leads to node b's own scratch
        return tmp_path / "scratch_b" if p == run / "checkpoints" else p

    two_ranks(monkeypatch, view)
    want = (rf"^run_dir={run}: its checkpoints/ \({run / 'checkpoints'}\) is not the same directory on every rank: "
            rf".* rank 1 \(host node-b\) does not see it")
    with pytest.raises(SettingsError, match=want):
        ckpt.check_shared_run_dir(run, checkpoints=True)
    ckpt.check_shared_run_dir(run, checkpoints=False)   # run_dir itself is shared


class ModelBuilt(Exception):
    pass


def test_a_training_launch_stops_before_it_reads_a_checkpoint_or_builds_its_model(tmp_path, monkeypatch):
    """The trainer makes the check as it claims the run directory: a node-local run_dir stops the launch with a
    config error (SettingsError) before any rank looks for a checkpoint there; the old trainer went on to build
    the model (here: ModelBuilt)."""
    from megatron.core import parallel_state

    import train.trainer
    from train.launch import compose_config, validate
    from train.trainer import Trainer

    run, node_b = tmp_path / "run", tmp_path / "node_b"
    cfg, layout = validate(compose_config(["recipe=keye_tiny_lm", "data=tokens_tiny", "train.micro_batch_size=1",
                                           "parallel.ep=1", f"run_dir={run}"]), world_size=1)
    monkeypatch.setattr(ckpt, "lock_run_dir", lambda d: None)   # held for the process's life: not this test's

    def build_lm(*a, **k):
        raise ModelBuilt()

    def find_resume_point(d):
        raise AssertionError("a rank looked for a checkpoint in a run directory not every rank sees")

    monkeypatch.setattr(train.trainer, "build_lm", build_lm)
    monkeypatch.setattr(ckpt, "find_resume_point", find_resume_point)
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(34000 + os.getpid() % 1000)), ("RANK", "0"),
                 ("WORLD_SIZE", "1")):
        monkeypatch.setitem(os.environ, k, v)
    real = ckpt.check_shared_run_dir

    def check(run_dir, **kw):   # the trainer's process group exists by now: rank 1 joins it here
        two_ranks(monkeypatch, lambda p: node_b / p.relative_to(tmp_path))
        real(run_dir, **kw)

    monkeypatch.setattr(ckpt, "check_shared_run_dir", check)
    try:
        with pytest.raises(SettingsError, match=r"is not the same directory on every rank: .*rank 1 \(host node-b\)"):
            Trainer(cfg, layout)
    finally:
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ranks_whose_node_sees_other_shards_stop_naming_them_and_their_host(tmp_path, monkeypatch):
    """Rank 1's node holds its own copy of the shards, one shard short: every rank stops with a config error naming
    it. A copy of the same shards at another path, written at another time, is the same data."""
    import shutil

    from data.video.ingest import IngestOptions, ingest
    from data.video.synthetic import make_synthetic_videos
    from data.video_stream import VideoBatchStream
    from tests.data.conftest import small_cfg
    from train.data_streams import check_same_data, data_summary

    vids, ann = make_synthetic_videos(tmp_path / "src", 0, seed=1, n_text=12)
    ingest(IngestOptions(videos=str(vids), annotations=str(ann), out=str(tmp_path / "shards"), shard_size_mb=0.002,
                         workers=1, progress=False))
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert len(shards) >= 3
    shutil.copytree(tmp_path / "shards", tmp_path / "node_b")
    for f in (tmp_path / "node_b").glob(shards[1].name.replace(".tar", ".*")):
        f.unlink()                                               # a copy that lacks one shard
    # a whole copy, at another path, its files of this time (copy keeps no modification time)
    shutil.copytree(tmp_path / "shards", tmp_path / "node_c", copy_function=shutil.copy)

    def stream(d):
        return VideoBatchStream(small_cfg(d, seq_len=256, text_overflow="continue"), seq_length=256,
                                micro_batch_size=1, global_batch_size=2, dp_rank=0, dp_size=2, seed=0)

    mine = stream(tmp_path / "shards")

    def world_of_two(rank1):
        def all_gather_object(out, obj, group=None):
            out[:] = [obj, data_summary(rank1)]
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "all_gather_object", all_gather_object)

    world_of_two(stream(tmp_path / "node_c"))
    check_same_data(mine, ["node-a", "node-c"])
    world_of_two(stream(tmp_path / "node_b"))
    n = len(mine.loader.catalogs[0])
    want = (rf"^the ranks do not see the same training data: rank 0 \(host node-a\) reads data.video.shards as {n} "
            rf"samples \(catalog \w+\), rank 1 \(host node-b\) data.video.shards as \d+ samples .*every node must "
            rf"see the same data files")
    with pytest.raises(SettingsError, match=want):
        check_same_data(mine, ["node-a", "node-b"])

    # the same shards, and token files mixed in (data.video.text_tokens) of one name and length but other tokens on
    # rank 1's node: the summary left that source out (an empty catalog for every rank), and it passed
    from data.token_files import write_token_files
    from data.video.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    for node, shift in (("tok_a", 0), ("tok_b", 1)):
        write_token_files([[(t + shift) % 200 for t in tok.encode(f"document {i} of the web")] + [tok.eos_id]
                           for i in range(60)], tmp_path / node / "web", vocab_size=tok.vocab_size,
                          meta={"tokenizer": repr(tok), "eos_id": tok.eos_id})

    def mixed(node):
        return VideoBatchStream(small_cfg(tmp_path / "shards", seq_len=256, text_overflow="continue",
                                          text_tokens=str(tmp_path / node / "web"), text_tokens_fraction=0.3),
                                seq_length=256, micro_batch_size=1, global_batch_size=2, dp_rank=0, dp_size=2, seed=0)

    mine = mixed("tok_a")
    world_of_two(mixed("tok_b"))
    with pytest.raises(SettingsError, match=r"rank 0 \(host node-a\) reads .*data.video.text_tokens as web: 60 "
                                            r"documents, \d+ tokens \(content \w+\), rank 1 \(host node-b\) "):
        check_same_data(mine, ["node-a", "node-b"])


def test_ranks_whose_node_holds_other_token_files_stop_too(tmp_path, monkeypatch):
    """data.tokens.paths through a node's own copy, one of whose files lacks documents: the same stop."""
    import shutil

    import numpy as np

    from data.token_files import TokenCorpus, TokenFileStream, write_token_files
    from train.data_streams import check_same_data, data_summary

    rng = np.random.default_rng(0)
    web, code = ([rng.integers(0, 300, 20).tolist() for _ in range(40)] for _ in range(2))
    for node, code_documents in (("node_a", code), ("node_b2", code[:30])):   # node_b2's copy lacks documents
        write_token_files(web, tmp_path / node / "web", vocab_size=512)
        write_token_files(code_documents, tmp_path / node / "code", vocab_size=512)
    shutil.copytree(tmp_path / "node_a", tmp_path / "node_b", copy_function=shutil.copy)   # a whole copy

    def stream(node):
        corpus = TokenCorpus(f"{tmp_path / node / 'web'},{tmp_path / node / 'code'}", seq_length=16, seed=0)
        return TokenFileStream(corpus, document_bounds=False, micro_batch_size=1, global_batch_size=2, dp_rank=0,
                               dp_size=2)

    mine = stream("node_a")
    for node, same in (("node_b", True), ("node_b2", False)):
        rank1 = data_summary(stream(node))
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(
            slice(None), [obj, rank1]))
        if same:
            check_same_data(mine, ["node-a", "node-b"])
            continue
        with pytest.raises(SettingsError, match=r"rank 0 \(host node-a\) reads data.tokens.paths as web, code: 80 "
                                                r"documents, 1600 tokens \(content \w+\), rank 1 \(host node-b\) "
                                                r"data.tokens.paths as web, code: 70 documents, 1400 tokens "
                                                r"\(content \w+\)\. "):
            check_same_data(mine, ["node-a", "node-b"])


def test_token_files_of_the_same_names_and_lengths_but_other_tokens_stop_too(tmp_path, monkeypatch):
    """A node's copy whose files have rank 0's names, documents and token counts (so sizes) but other tokens: another
    tokenization of the same lengths, or a block of the .bin written over. The summary compared names and counts, and
    it passed: the ranks trained on other rows without a word. Each is now told by the content fingerprint; a copy
    at another path and time is not."""
    import shutil

    import numpy as np

    from data.token_files import TokenCorpus, TokenFileStream, write_token_files
    from train.data_streams import check_same_data, data_summary

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 300, 20).tolist() for _ in range(40)]
    write_token_files(docs, tmp_path / "node_a" / "web", vocab_size=512)
    write_token_files([[(t + 1) % 300 for t in d] for d in docs], tmp_path / "retokenized" / "web", vocab_size=512)
    shutil.copytree(tmp_path / "node_a", tmp_path / "node_b", copy_function=shutil.copy)
    shutil.copytree(tmp_path / "node_a", tmp_path / "overwritten", copy_function=shutil.copy)
    with open(tmp_path / "overwritten" / "web.bin", "r+b") as f:    # a block in the middle, sizes unchanged
        f.seek(800)
        f.write(bytes(64))

    def stream(node):
        corpus = TokenCorpus(str(tmp_path / node / "web"), seq_length=16, seed=0)
        return TokenFileStream(corpus, document_bounds=False, micro_batch_size=1, global_batch_size=2, dp_rank=0,
                               dp_size=2)

    mine = stream("node_a")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    for node, same in (("node_b", True), ("retokenized", False), ("overwritten", False)):
        rank1 = data_summary(stream(node))
        monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(
            slice(None), [obj, rank1]))
        if same:
            check_same_data(mine, ["node-a", "node-b"])
            continue
        with pytest.raises(SettingsError, match=r"rank 0 \(host node-a\) reads data.tokens.paths as web: 40 "
                                                r"documents, 800 tokens \(content (\w+)\), rank 1 \(host node-b\) "
                                                r"data.tokens.paths as web: 40 documents, 800 tokens \(content "
                                                r"(?!\1)\w+\)\. "):
            check_same_data(mine, ["node-a", "node-b"])


def _arrays_in_a_thread(directory, want, out, *, build_s=0.0):
    """data/node_files.shared_arrays of one array `want` under `directory`, in a thread: (arrays, note) into `out`."""
    import threading
    import time

    import numpy as np

    from data import node_files

    def build():
        time.sleep(build_s)
        return (want,)

    def run():
        out.append(node_files.shared_arrays(directory, "epoch0", ("order",), build,
                                            lambda a: node_files.shaped(a, [(len(want), np.int64)])))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_lock_whose_holder_died_on_another_node_is_waited_for_a_bounded_time_and_named(tmp_path, monkeypatch):
    """An index_dir on NFSv3: a node died while its process held an epoch's lock, which the server keeps until that
    node comes back. Every other process waited on it forever (here: the thread still waiting after 5 s). The waiter
    now stops once the holder's count in the lock file has not moved for LOCK_STALE_S, builds the arrays in its own
    memory, and its note names the lock file and the holder."""
    import fcntl
    import time

    import numpy as np

    from data import node_files
    from tests.data.conftest import is_mapped

    monkeypatch.setattr(node_files, "LOCK_STALE_S", 0.5)   # 120 s in a run; the beat below scales with it
    monkeypatch.setattr(node_files, "LOCK_BEAT_S", 0.1)
    lock = tmp_path / "epoch0.lock"
    lock.write_text("host node-b pid 4242 beat 7\n")
    dead = open(lock, "a+")        # another open file: flock conflicts with it as with another node's process
    fcntl.flock(dead, fcntl.LOCK_EX)
    want, out = np.arange(1000, dtype=np.int64), []
    began = time.monotonic()
    t = _arrays_in_a_thread(tmp_path, want, out)
    t.join(5.0)
    try:
        assert not t.is_alive(), "still waiting on the dead holder's lock after 5 s"
        (got,), note = out[0]
        assert (got == want).all() and not is_mapped(got)                     # built in memory, as without locks
        assert 0.5 <= time.monotonic() - began < 3.0
        assert re.fullmatch(rf"{tmp_path}: {lock} is held by host node-b pid 4242 beat 7, which has not written that "
                            rf"it lives for \d+ s \(LOCK_STALE_S 0\.5\): its process or node died holding it .*Remove "
                            rf"{lock} .*", note), note
    finally:
        dead.close()
        t.join(5.0)


def test_a_holder_that_builds_for_longer_than_the_bound_is_waited_for(tmp_path, monkeypatch):
    """A live holder writes that it lives every LOCK_BEAT_S while it builds: a build that takes longer than
    LOCK_STALE_S is waited for, and the waiter maps what it wrote (no copy of its own, no note)."""
    import time

    import numpy as np

    from data import node_files
    from tests.data.conftest import is_mapped

    monkeypatch.setattr(node_files, "LOCK_STALE_S", 0.4)
    monkeypatch.setattr(node_files, "LOCK_BEAT_S", 0.05)
    want, first, second = np.arange(1000, dtype=np.int64), [], []
    holder = _arrays_in_a_thread(tmp_path, want, first, build_s=1.2)   # three times the bound
    deadline = time.monotonic() + 5.0
    while (not (tmp_path / "epoch0.lock").exists() or not (tmp_path / "epoch0.lock").read_text()) and \
            time.monotonic() < deadline:
        time.sleep(0.01)                                              # until the holder holds it
    waiter = _arrays_in_a_thread(tmp_path, want + 1, second)          # what it would build is told apart
    holder.join(5.0)
    waiter.join(5.0)
    (got,), note = second[0]
    assert note == "" and is_mapped(got) and (got == want).all()
    assert re.fullmatch(rf"host {re.escape(node_files.host_name())} pid {os.getpid()} beat [1-9]\d*",
                        (tmp_path / "epoch0.lock").read_text().strip())


def test_epoch_orders_another_rank_reads_stay_on_disk(tmp_path, monkeypatch):
    """An index_dir shared by the nodes (the default <run_dir>/token_index) and a source of few rows an epoch (9
    here, 32 a global batch: a step spans epochs). In a step rank 1 reads global samples 16 after rank 0's, at the same
    time; as it mapped each epoch it removed the files of the epochs before the one before it, those rank 0 was
    reading through its maps (old: rank 0 read epoch 0 in step 0 with its files gone). On NFS a file removed under
    another node's map is ESTALE, SIGBUS in the reader. Files now go once every rank is past them (release_before):
    the epoch rank 0 reads is on disk, each epoch is built once, the rows are a reader's without index_dir, and old
    epochs still go."""
    import numpy as np

    from data.token_files import TokenCorpus, TokenFileStream, TokenSource, write_token_files

    rng = np.random.default_rng(0)
    write_token_files([rng.integers(0, 300, 16).tolist() for _ in range(10)], tmp_path / "web", vocab_size=512)
    built, real_build = [], TokenSource._build

    def build(self, e):
        if self.index_dir is not None:
            built.append(e)
        return real_build(self, e)
    monkeypatch.setattr(TokenSource, "_build", build)

    def stream(rank, index_dir):
        corpus = TokenCorpus(str(tmp_path / "web"), seq_length=16, seed=0, index_dir=index_dir)
        return TokenFileStream(corpus, document_bounds=False, micro_batch_size=1, global_batch_size=32, dp_rank=rank,
                               dp_size=2)

    first, second, alone = stream(0, tmp_path / "ix"), stream(1, tmp_path / "ix"), stream(0, None)
    source = first.corpus.sources[0]
    assert source.per_epoch == 9

    def on_disk():
        return sorted(int(f.name[5:].split(".")[0]) for f in source.index_dir.glob("epoch*.order.npy"))

    for step in range(5):
        for k in range(16):   # micro-batch k of each rank at once: global samples 32 step + k and 32 step + 16 + k
            got, want = next(first), next(alone)
            next(second)
            assert all(torch_equal(got[x], want[x]) for x in want)
            reading = (32 * step + k) // 9
            assert reading in on_disk(), (step, k, reading, on_disk())
    assert sorted(built) == list(range(18))           # the 160 samples' epochs 0..17, each built once
    # rank 1's last step began at global sample 144: no rank reads below 144 - 2 x 32 = 80 (epoch 8) any more
    assert on_disk() == list(range(8, 18))


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_a_blend_releases_each_source_from_its_own_next_sample(tmp_path):
    """release_before takes each source of a blend from the index of its next sample at the global floor: counted
    here by the samples _where assigns it (the reference), over a blend whose weights changed at global sample 50."""
    import numpy as np

    from data.token_files import TokenCorpus, write_token_files

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_token_files([rng.integers(0, 300, 20).tolist() for _ in range(30)], tmp_path / name, vocab_size=512)
    corpus = TokenCorpus(f"{tmp_path / 'a'},{tmp_path / 'b'}", weights=[0.2, 0.8], seq_length=16, seed=0)
    corpus.continue_blend([[0, [0.7, 0.3]], [50, [0.2, 0.8]]], 120)
    for i in (0, 1, 7, 49, 50, 51, 119, 120, 300):
        drawn = [s for s, _ in corpus._where(0, i)] if i else []
        assert corpus.counts_before(i) == [drawn.count(0), drawn.count(1)], i
