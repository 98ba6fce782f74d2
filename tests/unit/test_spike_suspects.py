"""Which data made a step's gradient norm spike (train/spikes.py rank_suspects, part_losses, sample_words; train/
trainer.py Trainer._spike_suspects): the ranking against hand-computed numbers, and the trainer in this process on
the tiny MoE LM with one row of one micro-batch made to spike (its embeddings scaled), whose record and message must
name that micro-batch and that sample first: the truth is the row the test scaled, found by the stream's own
numbering of global samples (step x global batch + micro-batch x micro-batch size + row). data.exclude_spikes reads
the first suspect alone. The 2-rank case (a rank's own gradient norm before the reduction): tests/dist/
test_nonfinite.py."""

import json

import pytest
import torch

from data.exclude import ExcludeError, read_exclude
from tests.launch_util import one_rank_world
from train.spikes import part_losses, rank_suspects, sample_words


def test_part_losses_are_each_documents_masked_sum_and_tokens():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]])
    parts = torch.tensor([[0, 0, 1, 1, 2, 2]])
    # by hand: part 0 = 1 + 2 over 2 tokens; part 1 = 4 (3 is masked) over 1; part 2 = 5 + 6 over 2
    assert part_losses(loss, mask, parts, 3).tolist() == [[3.0, 4.0, 11.0], [2.0, 1.0, 2.0]]
    assert part_losses(torch.ones(6, 1), mask, parts, 3) is None   # not per token in the parts' layout


def test_suspects_sum_cp_shares_and_rank_by_own_norm_then_loss():
    """4 ranks at one pipeline and tensor rank (peers: their own norms compare): 0 and 1 the CP pair of one replica
    (rank 1 reads rank 0's data, each holds half of its tokens), 2 and 3 another replica's pair. Rank 2's own norm is
    2 x the median of the four, so replica 2's micro-batches come first, though replica 0's micro-batch 1 has the
    higher loss; a TP rank other than 0 (rank 4, another tensor rank) counts no loss and has its own peers."""
    mb = lambda s, n, parts=None: {"loss": s, "tokens": n, "parts": parts}   # noqa: E731
    half0 = [mb(2.0, 2, [[1.0, 1], [1.0, 1]]), mb(10.0, 2, [[9.0, 1], [1.0, 1]])]
    half2 = [mb(2.0, 2, [[1.0, 1], [1.0, 1]]), mb(6.0, 2, [[1.0, 1], [5.0, 1]])]
    suspects, replicas = rank_suspects([0, 0, 2, 2, 0], [half0, half0, half2, half2, []], [1.0, 1.0, 3.0, 2.0, 7.0],
                                       [(0, 0)] * 4 + [(0, 1)])
    # replica 0: micro-batch means (2 + 2) / 4 = 1 and (10 + 10) / 4 = 5; replica 2: 4 / 4 = 1 and 12 / 4 = 3
    # the step's median of [1, 5, 1, 3] = 2; own norms' median 1.5: ratios 2/3, 2/3, 2, 4/3; rank 4 alone: 1;
    # replica 0's micro-batch 1 (z 3 / 1.4826 = 2.02) does not stand out: not listed
    assert [(s["rank"], s["micro_batch"]) for s in suspects] == [(2, 1), (2, 0)]
    top = suspects[0]
    assert (top["loss"], top["median"], top["norm_ratio"], top["part"], top["part_loss"]) == (3.0, 2.0, 2.0, 1, 5.0)
    # robust z: |x - 2| over [1, 5, 1, 3] = [1, 3, 1, 1], MAD 1, so z = (3 - 2) / 1.4826
    assert top["z"] == pytest.approx(1 / 1.4826)
    assert replicas == {0: {"rank": 4, "own_norm": 7.0, "norm_ratio": 1.0},
                        2: {"rank": 2, "own_norm": 3.0, "norm_ratio": 2.0}}
    # without own norms (a frozen LM, or none taken): the loss alone orders; none stands out (z 2.02 at most), so
    # the best guess alone, replica 0's micro-batch 1, with its summed CP shares: part 0 = (9 + 9) / 2
    alone, _ = rank_suspects([0, 0, 2, 2, 0], [half0, half0, half2, half2, []], [None] * 5, [(0, 0)] * 5)
    assert [(s["rank"], s["micro_batch"], s["stands_out"]) for s in alone] == [(0, 1, False)]
    assert alone[0]["part"] == 0 and alone[0]["part_loss"] == 9.0


def test_the_z_score_of_an_outlier_among_equal_losses_is_not_zero():
    """Three of four micro-batches with the same loss: their median absolute deviation is 0; the z-score falls back to
    the standard deviation (by hand: values [1, 1, 1, 5], mean 2, pstdev sqrt((1 + 1 + 1 + 9) / 4) = sqrt 3)."""
    mb = lambda s: {"loss": s, "tokens": 1.0, "parts": None}   # noqa: E731
    suspects, _ = rank_suspects([0], [[mb(1.0), mb(1.0), mb(5.0), mb(1.0)]], [None], [(0, 0)])
    assert suspects[0]["micro_batch"] == 2 and suspects[0]["z"] == pytest.approx(4 / 3 ** 0.5)


def test_only_suspects_that_stand_out_are_listed_and_norm_noise_does_not_rank_first():
    """4 data-parallel ranks, 2 micro-batches each. Their own norms differ by noise (ratios 1.1, 0.9, 1.0, 1.0 against
    the median 1.0, below NORM_STANDS_OUT), and rank 2's micro-batch 1 has a loss far above the rest: it alone is
    listed, first. Ranked by the raw ratio, replica 0's two ordinary micro-batches came first (z 1.35 and 0), then
    the outlier (z 94.4) third. With no outlier at all the best guess alone is listed, flagged; one rank's norm at 3
    x the other's (2 ranks) lists both of its micro-batches."""
    mb = lambda s: {"loss": s, "tokens": 1.0, "parts": None}   # noqa: E731
    shares = [[mb(2.0), mb(2.1)], [mb(1.9), mb(2.0)], [mb(2.05), mb(9.0)], [mb(1.95), mb(2.0)]]
    suspects, _ = rank_suspects([0, 1, 2, 3], shares, [1.1, 0.9, 1.0, 1.0], [(0, 0)] * 4)
    # by hand: means [2, 2.1, 1.9, 2, 2.05, 9, 1.95, 2]: median 2, absolute deviations [0, .1, .1, 0, .05, 7, .05, 0],
    # MAD 0.05, so z of 9 = 7 / (1.4826 x 0.05) = 94.4, of 2.1 = 1.35 (below 3.5)
    assert [(s["rank"], s["micro_batch"], s["stands_out"]) for s in suspects] == [(2, 1, True)]
    assert suspects[0]["z"] == pytest.approx(7 / (1.4826 * 0.05))
    quiet = [[mb(2.0), mb(2.1)], [mb(1.9), mb(2.0)]]
    suspects, _ = rank_suspects([0, 1], quiet, [1.0, 1.0], [(0, 0)] * 2)
    assert [(s["rank"], s["micro_batch"], s["stands_out"]) for s in suspects] == [(0, 1, False)]   # highest loss
    # 2 ranks, norms 3 and 1: median 2, ratios 1.5 and 0.5; both micro-batches of rank 1, ordered by loss
    suspects, replicas = rank_suspects([0, 1], quiet, [1.0, 3.0], [(0, 0)] * 2)
    assert [(s["rank"], s["micro_batch"]) for s in suspects] == [(1, 1), (1, 0)]
    assert replicas[1]["norm_ratio"] == 1.5 and all(s["stands_out"] for s in suspects)


def test_sample_words_name_keys_documents_or_global_samples():
    assert sample_words([{"stream": "video", "packs": [{"samples": ["s-1.tar/a", "s-1.tar/b"]}]}]) == \
        "samples s-1.tar/a, s-1.tar/b"
    assert sample_words([{"stream": "tokens", "global_samples": [4], "documents": [["web", 3]]}]) == \
        "samples web#3"
    assert sample_words([{"stream": "synthetic_tokens", "global_samples": [5, 6, 7]}]) == "global samples 5..7"


def _spike_record(suspects):
    whole = {"micro_batches": None, "streams": [{"stream": "video", "packs": [
        {"epoch": 0, "pack": 1, "samples": ["a.tar/x", "a.tar/bad"]},
        {"epoch": 0, "pack": 2, "samples": ["a.tar/y"]}]}]}
    return {"step": 3, "action": "skipped", "spikes": [{"norm": "grad_norm", "value": 9.0, "median": 1.0}],
            "samples": {"0": whole}, "suspects": suspects}


def test_exclude_spikes_suspect_takes_the_first_suspects_samples(tmp_path):
    first = {"rank": 0, "micro_batch": 0, "samples": {"micro_batches": [0], "streams": [
        {"stream": "video", "packs": [{"epoch": 0, "pack": 1, "samples": ["a.tar/bad"]}]}]}}
    second = {"rank": 0, "micro_batch": 1, "samples": {"micro_batches": [1], "streams": [
        {"stream": "video", "packs": [{"epoch": 0, "pack": 2, "samples": ["a.tar/y"]}]}]}}
    path = tmp_path / "spikes.jsonl"
    path.write_text(json.dumps(_spike_record([first, second])) + "\n")
    assert read_exclude(str(path)).keys == {"a.tar/x", "a.tar/bad", "a.tar/y"}   # the whole step, as before
    assert read_exclude(str(path), spikes="suspect").keys == {"a.tar/bad"}
    path.write_text(json.dumps(_spike_record([])) + "\n")
    with pytest.raises(ExcludeError, match=r"spikes\.jsonl line 1: data\.exclude_spikes=suspect, but the spikes\.jsonl "
                       r"record of step 3 names no suspect"):
        read_exclude(str(path), spikes="suspect")
    with pytest.raises(ExcludeError, match=r"data\.exclude_spikes must be one of \('step', 'suspect'\), got 'one'"):
        read_exclude(str(path), spikes="one")


def test_a_bad_exclude_spikes_setting_stops_the_config():
    from train.config import to_config
    from train.launch import compose_config

    with pytest.raises(ValueError, match=r"data\.exclude_spikes must be 'step' or 'suspect', got 'all'"):
        to_config(compose_config(["recipe=keye_tiny_lm", "data.exclude_spikes=all"]))


# ------------------------------------------------------------------------------------------------------------------
# the trainer, in this process

@pytest.fixture()
def one_rank(tmp_path):
    """A gloo world of one rank that the trainer builds its process groups in (tests/launch_util.one_rank_world;
    megatron's aux-loss scale left by an earlier model is reset for every test by tests/conftest.py)."""
    with one_rank_world():
        yield tmp_path


MBS, GBS, STEP, MICRO, ROW = 2, 6, 2, 2, 1   # the 2nd step's micro-batch 2, its row 1, is made to spike


def test_the_record_names_the_injected_micro_batch_and_sample_first(one_rank, caplog):
    from train.launch import compose_config, validate
    from train.trainer import Trainer

    cfg, layout = validate(compose_config(
        ["recipe=keye_tiny_lm", "parallel.ep=1", "train.wandb.enabled=false", f"train.steps={STEP + 1}",
         "train.warmup_steps=1", "train.seq_length=16", f"train.micro_batch_size={MBS}",
         f"train.global_batch_size={GBS}", "model.lm.num_layers=1", "train.checkpoint.enabled=false",
         "train.spike.factor=5", "train.spike.window=1", "train.spike.skip_steps=1", f"run_dir={one_rank}",
         # auxiliary-loss-free balancing on (its bias moved by 0.05 a step): the skipped step must not move it
         "model.lm.moe_expert_bias=true", "model.lm.moe_bias_update_rate=0.05"]),
        world_size=1)
    tr = Trainer(cfg, layout)
    assert tr.own_grads.experts_own   # parallel.ep=1: the experts' gradients join the own norm
    calls = []

    def scale_one_row(module, args, out):   # out [s, b, h]: this micro-batch's last hidden states, normalised
        calls.append(tr.step)
        if tr.step == STEP - 1 and calls.count(STEP - 1) == MICRO + 1:
            out = out.clone()
            out[:, ROW] *= 30.0   # the row's logits x 30: confidently wrong, its loss and gradients large
            return out
    # (the embeddings scaled would not do: the layers' pre-norms and the final norm take their scale away)
    hook = tr.model[0].module.decoder.final_layernorm.register_forward_hook(scale_one_row)
    try:
        tr.train()
    finally:
        hook.remove()
        tr.close()
    (rec,) = [json.loads(x) for x in (one_rank / "spikes.jsonl").read_text().splitlines()]
    truth = (STEP - 1) * GBS + MICRO * MBS + ROW   # the stream's global sample number of the scaled row
    top = rec["suspects"][0]
    assert (rec["step"], top["rank"], top["micro_batch"], top["part"]) == (STEP, 0, MICRO, ROW)
    assert top["samples"]["streams"][0]["global_samples"] == [truth]
    assert top["loss"] > 2 * top["median"] and top["part_loss"] > top["loss"]   # (x 30 logits: 14.9 against 6.1)
    assert len(calls) == (STEP + 1) * GBS // MBS   # one forward per micro-batch: the hook counted them right
    assert rec["samples"]["0"]["streams"][0]["global_samples"] == list(range((STEP - 1) * GBS, STEP * GBS))
    assert (f"the suspects, by their replica's own gradient norm, then loss: 1) rank 0 micro-batch {MICRO} "
            f"(global samples {truth}): loss") in caplog.text
    # the expert bias each step routed with: moved by the applied step 1, not by the skipped step 2 (the trainer
    # updates it after applied steps only, as it updates the weights)
    bias = {r["step"]: (r["moe_bias_min"], r["moe_bias_max"]) for r in map(json.loads, open(one_rank / "metrics.jsonl"))
            if "moe_bias_min" in r}
    assert bias[1] == (0.0, 0.0) and bias[2] != bias[1] and bias[3] == bias[2], bias
