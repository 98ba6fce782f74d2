"""The words of a non-finite step's message (train/nonfinite.py NonFinite, format_ranks): which ranks it names and
where it says the NaN arose. The whole path, through the launcher, is tests/dist/test_nonfinite.py."""

import json

from train.nonfinite import NonFinite, format_ranks as _ranks


def test_ranks_are_written_as_runs():
    assert _ranks([3]) == "rank 3"
    assert _ranks([0, 1, 2, 3, 8]) == "ranks 0-3, 8"
    assert _ranks([1, 3, 4, 6]) == "ranks 1, 3-4, 6"


def test_the_loss_names_the_origin_before_the_gradients_it_spread_to():
    # a forward's NaN on ranks 4-5 reaches other ranks' gradients through the experts' exchange before the
    # data-parallel reduction: the ranks whose loss was not finite are where to look
    bad = NonFinite(grads=["the language model's"], loss_ranks=[4, 5], grad_ranks=[0, 1, 4, 5])
    assert bad.origin == [4, 5]
    assert bad.where() == ("before their reduction over ranks, the loss on ranks 4-5 and the gradients on ranks 0-1, "
                           "4-5 were not finite")
    # every loss finite: the ranks whose own gradients were not (a backward that overflowed)
    backward = NonFinite(grads=["the language model's"], loss_ranks=[], grad_ranks=[2])
    assert backward.origin == [2]
    assert backward.where() == "before their reduction over ranks, the gradients on rank 2 were not finite"
    late = NonFinite(grads=["the vision tower's"], loss_ranks=[], grad_ranks=[])
    assert late and late.origin == []
    assert late.where().endswith("every rank's loss and gradients were finite: it arose in the reduction or after it")
    assert not NonFinite(grads=[], loss_ranks=[], grad_ranks=[])


def test_a_run_over_several_hosts_names_the_host_of_the_ranks_where_it_arose():
    """A NaN that arises on the gradients of every rank of one node points at that node's hardware: the message
    named the ranks alone ("the gradients on ranks 2-3"), and which node holds them depends on the rendezvous. On one
    host the message stays as it was."""
    hosts = ["node-a", "node-a", "node-b", "node-b"]
    bad = NonFinite(grads=["the language model's"], loss_ranks=[], grad_ranks=[2, 3])
    assert bad.where(hosts) == ("before their reduction over ranks, the gradients on ranks 2-3 (host node-b) were not "
                                "finite")
    spread = NonFinite(grads=["the language model's"], loss_ranks=[1, 2], grad_ranks=[1, 2])
    assert "the loss on ranks 1-2 (hosts node-a, node-b)" in spread.where(hosts)
    alone = "before their reduction over ranks, the gradients on ranks 2-3 were not finite"
    assert bad.where(["vm"] * 4) == bad.where() == alone


def test_the_record_names_each_ranks_data_once(tmp_path, monkeypatch, caplog):
    """parallel.cp=2 over 2 data replicas (ranks 0-1 and 2-3): a NaN in replica 2's micro-batch 1 makes the loss of
    both its CP ranks NaN (its document spans both halves). Rank 3 reads rank 2's data: the record and the messages
    name it once, as a spiking step's do; the ranks where it arose stay every one. The record named ranks 2 and 3,
    the same samples twice (a CP2 run with every rank's loss NaN wrote data {"0": ..., "1": ...}, both "global
    samples 16..31")."""
    import types

    import train.trainer as trainer_module
    from train.config import Config

    mine = "a synthetic_tokens stream: global samples 0..7"
    bad_text = "its micro-batch 1 of 2, whose loss was not finite: a synthetic_tokens stream: global samples 12..15"
    bad_record = {"micro_batches": [1], "streams": [{"stream": "synthetic_tokens", "global_samples": [12, 13, 14, 15]}]}

    class Stream:
        def describe_step(self, micro, parts):
            return mine

        def step_record(self, micro, parts):
            return {"stream": "synthetic_tokens", "global_samples": list(range(8))}

    def gather(out, own):
        out[:] = [own, own, (bad_text, bad_record), (bad_text, bad_record)]
    monkeypatch.setattr(trainer_module.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(trainer_module.dist, "all_gather_object", gather)
    cfg = Config(run_dir=str(tmp_path))
    cfg.train.skip_nonfinite_steps, cfg.train.checkpoint.enabled, cfg.data.kind = 1, False, "tokens"
    tr = types.SimpleNamespace(cfg=cfg, streams=[Stream()], rank=0, run_dir=str(tmp_path), step=3, hosts=[""] * 4,
                               nonfinite_in_row=0, skipped_steps=0, num_microbatches=2,
                               _finish_saves=lambda blocking: None)
    bad = NonFinite(grads=["the language model's"], loss_ranks=[2, 3], grad_ranks=[0, 1, 2, 3])
    with caplog.at_level("WARNING"):
        trainer_module.Trainer._skip_or_stop(tr, bad, float("nan"), {}, {})
    (rec,) = [json.loads(x) for x in (tmp_path / "nonfinite.jsonl").read_text().splitlines()]
    assert (rec["loss_ranks"], rec["grad_ranks"]) == ([2, 3], [0, 1, 2, 3])
    assert rec["data"] == {"2": bad_text} and rec["samples"] == {"2": bad_record}
    assert f"the loss on ranks 2-3 and the gradients on ranks 0-3 were not finite; rank 2's data in the step: " \
           f"{bad_text}; this rank's data in the step: {mine}" in caplog.text
    assert "rank 3's data" not in caplog.text
