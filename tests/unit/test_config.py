"""Config errors stop the run before any process group is built, naming the offending key."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from train.config import MODEL_KEYS_FREE_ON_RESUME, Config, to_config
from train.launch import compose_config, validate

REPO = Path(__file__).resolve().parents[2]


def _compose(*overrides):
    return compose_config(overrides)


def _validate(*overrides, world_size=2):
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        return validate(_compose(*overrides))
    finally:
        if old is None:
            os.environ.pop("WORLD_SIZE")
        else:
            os.environ["WORLD_SIZE"] = old


def test_tiny_recipe_composes_into_typed_config():
    cfg, layout = _validate("recipe=keye_tiny_lm")
    assert isinstance(cfg, Config)
    assert cfg.recipe_name == "keye_tiny_lm" and cfg.resolved_run_dir() == "runs/keye_tiny_lm"
    assert (layout.ep, layout.dp, layout.tp) == (2, 2, 1)


def test_recipe_values_win_over_schema_defaults_and_cli_wins_over_recipe():
    cfg, _ = _validate("recipe=keye_tiny_lm", "train.lr=1e-3", "parallel.ep=1")
    assert cfg.train.lr == 1e-3 and cfg.parallel.ep == 1
    assert cfg.train.steps == 60  # from recipes/train/tiny.yaml, not the schema default (100)


def test_full_size_recipe_layout_for_one_node():
    cfg, layout = _validate("recipe=keye_30b_a3b_lm", world_size=8)
    assert cfg.model.lm.num_experts == 128 and layout.ep == 8 and layout.dp == 8
    # 4 KV heads: tp 8 is refused before the build, naming the TP sizes the model runs at
    with pytest.raises(ValueError, match=r"^parallel\.tp \(8\) must divide model\.lm\.num_query_groups \(4, the "
                                         r"KV heads\).* runs at tp 1, 2, 4;"):
        _validate("recipe=keye_30b_a3b_lm", "parallel.tp=8", "parallel.ep=1", world_size=8)


def test_full_size_multimodal_recipe_needs_shards_and_builds_the_vit():
    with pytest.raises(Exception, match="shards"):
        _validate("recipe=keye_30b_a3b", world_size=8)
    cfg, layout = _validate("recipe=keye_30b_a3b", "data.video.shards=/data/shards", world_size=8)
    v = cfg.model.vision
    assert v.enabled and (v.depth, v.hidden, v.heads, v.mlp, v.patch) == (27, 1152, 16, 4304, 14)
    assert 0.40e9 < v.build(cfg.model.lm.hidden_size).num_params() < 0.45e9  # SigLIP-so400m + projector
    assert cfg.data.kind == "video" and cfg.train.micro_batch_size == 1 and cfg.parallel.vit.layout == "spread"


def test_vision_needs_video_data():
    with pytest.raises(ValueError, match="data.kind=video"):
        _validate("recipe=keye_tiny", "data=synthetic_tokens")
    _validate("recipe=keye_tiny_vl_ksa")  # vision with KSA: summary slots per packed document
    _validate("recipe=keye_tiny_vl_ksa_distill")  # and its distillation, per packed document
    _validate("recipe=keye_tiny", "parallel.vit.group=2")  # the vision phase in rounds of 2 of the 4 micro-batches
    with pytest.raises(ValueError, match=r"parallel\.vit\.group \(3\) must divide the micro-batches per step"):
        _validate("recipe=keye_tiny", "parallel.vit.group=3")
    with pytest.raises(ValueError, match="parallel.vit.layout"):
        _validate("recipe=keye_tiny", "parallel.vit.layout=everywhere")


def test_a_language_model_alone_on_the_packed_loader_takes_text_only(tmp_path):
    """model.vision.enabled=false with data.kind=video: one sequence per micro-batch, text-only synthetic data, and
    shards that hold text-only samples only (a video's frames would reach the LM as placeholder tokens)."""
    from data.video.ingest import IngestOptions, ingest
    from data.video.synthetic import make_synthetic_videos
    from train.launch import check_paths

    cfg, _ = _validate("recipe=keye_tiny_lm", "data=text_tiny", "train.micro_batch_size=1")
    assert cfg.data.kind == "video" and cfg.data.synthetic_texts > 0 and not cfg.model.vision.enabled
    with pytest.raises(ValueError, match="train.micro_batch_size must be 1, got 4"):
        _validate("recipe=keye_tiny_lm", "data=text_tiny")
    with pytest.raises(ValueError, match=r"cannot see the synthetic videos and images \(data.synthetic_videos=24"):
        _validate("recipe=keye_tiny_lm", "data=video_tiny", "train.micro_batch_size=1")
    with pytest.raises(ValueError, match="are all 0: the synthetic data would be empty"):
        _validate("recipe=keye_tiny_lm", "data=text_tiny", "train.micro_batch_size=1", "data.synthetic_texts=0")
    vids, ann = make_synthetic_videos(tmp_path / "mixed", 1, n_text=3, max_seconds=2.0)
    ingest(IngestOptions(videos=None, annotations=str(_text_only(ann, tmp_path)), out=str(tmp_path / "text"),
                         progress=False))
    ingest(IngestOptions(videos=str(vids), annotations=str(ann), out=str(tmp_path / "mixed"), progress=False,
                         workers=1))
    lm = ("recipe=keye_tiny_lm", "data=text_tiny", "train.micro_batch_size=1", f"run_dir={tmp_path / 'run'}")
    check_paths(_validate(*lm, f"data.video.shards={tmp_path / 'text'}")[0])
    with pytest.raises(ValueError, match=r"data.video.shards=.* holds 1 video and 0 image sample\(s\) \(first: "
                                         r"shard-000000.tar/clip_00000-.*model.vision.enabled=false"):
        check_paths(_validate(*lm, f"data.video.shards={tmp_path / 'mixed'}")[0])


def test_url_shards_are_checked_before_the_model_is_built(tmp_path):
    """Shards on object storage given on the command line (quoted for Hydra): the launch reads the first and last
    shard's index, so a brace range past the last shard stops it naming that index's URL; a held-out shard that is
    also training data is refused as a local one is; a URL with a query string in the config is refused."""
    from data.video.shards import ShardWriter
    from tests.data.test_remote_shards import Server
    from train.launch import check_paths

    for i in range(3):
        w = ShardWriter(tmp_path, i)
        w.add_text_sample(f"text-{i}", {"kind": "text", "video": None, "key": f"text-{i}",
                                        "annotation": {"text": f"text {i}"}})
        w.close()
    srv = Server(tmp_path)
    try:
        lm = ("recipe=keye_tiny_lm", "data=text_tiny", "train.micro_batch_size=1", f"run_dir={tmp_path / 'run'}")
        check_paths(_validate(*lm, f"data.video.shards='{srv.url}/shard-{{000000..000001}}.tar'",
                              f"data.video.eval_shards='{srv.url}/shard-000002.tar'")[0])
        with pytest.raises(ValueError, match=rf"data.video.shards=.*: shard index {srv.url}/shard-000003.idx.json of "
                                             rf".*: not found"):
            check_paths(_validate(*lm, f"data.video.shards='{srv.url}/shard-{{000000..000003}}.tar'")[0])
        with pytest.raises(ValueError, match=rf"data.video.eval_shards=.*1 shard file\(s\) are also training data "
                                             rf"\({srv.url}/shard-000000.tar"):
            check_paths(_validate(*lm, f"data.video.shards='{srv.url}/shard-{{000000..000001}}.tar'",
                                  f"data.video.eval_shards='{srv.url}/shard-000000.tar'")[0])
        with pytest.raises(ValueError, match=rf"VideoDataConfig.shards: '{srv.url}/shard-000000.tar' carries "
                                             r"credentials") as e:
            _validate(*lm, f"data.video.shards='{srv.url}/shard-000000.tar?sig=S3CR3T'")
        assert "S3CR3T" not in str(e.value)
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


def test_token_files_settings_and_paths_are_checked(tmp_path):
    """data.kind=tokens: paths required by the real-data recipe, one row per micro-batch with document bounds, a
    language model alone, held-out files for train.eval, files that exist, fit the model's vocabulary and are not
    also held out."""
    from data.token_files import write_token_files
    from train.launch import check_paths

    cfg, _ = _validate("recipe=keye_tiny_lm", "data=tokens_tiny", "train.micro_batch_size=1")
    assert cfg.data.kind == "tokens" and cfg.data.tokens.paths == "" and cfg.data.tokens.document_bounds
    with pytest.raises(ValueError, match="data.tokens.paths is required"):
        _validate("recipe=keye_tiny_lm", "data=tokens", "train.micro_batch_size=1")
    with pytest.raises(ValueError, match="train.micro_batch_size must be 1, got 4 .*document_bounds=false"):
        _validate("recipe=keye_tiny_lm", "data=tokens_tiny")
    assert _validate("recipe=keye_tiny_lm", "data=tokens_tiny", "data.tokens.document_bounds=false")[0].train.micro_batch_size == 4
    with pytest.raises(ValueError, match=r"needs video data .*data.kind=tokens feeds a language model alone; .*data.video.text_tokens"):
        _validate("recipe=keye_tiny", "data=tokens_tiny")
    for name, vocab in (("a", 512), ("b", 512), ("wide", 151936)):
        # one row of the recipe's train.seq_length + 1 = 257 tokens each
        write_token_files([list(range(1, 258))], tmp_path / name, vocab_size=vocab, meta={"tokenizer": f"T{vocab}"})
    lm = ("recipe=keye_tiny_lm", "data=tokens", "train.micro_batch_size=1", f"run_dir={tmp_path / 'run'}",
          f"data.tokens.paths={tmp_path / 'a'}")
    with pytest.raises(ValueError, match="train.eval.interval=5 needs held-out data: set data.tokens.eval_paths"):
        _validate(*lm, "train.eval.interval=5")
    check_paths(_validate(*lm, f"data.tokens.eval_paths={tmp_path / 'b'}")[0])
    with pytest.raises(ValueError, match=r"data.tokens.eval_paths=.*a is also training data"):
        check_paths(_validate(*lm, f"data.tokens.eval_paths={tmp_path / 'a.idx'}")[0])
    with pytest.raises(ValueError, match=r"data.tokens.paths: .*wide was tokenized with T151936 \(vocab_size 151936\), "
                                         r"larger than model.lm.vocab_size \(512\)"):
        check_paths(_validate(*lm[:-1], f"data.tokens.paths='{tmp_path / 'a'},{tmp_path / 'wide'}'")[0])
    with pytest.raises(ValueError, match=r"data.tokens.paths=.*missing.bin and .*missing.idx do not exist"):
        check_paths(_validate(*lm[:-1], f"data.tokens.paths={tmp_path / 'missing'}")[0])


def _text_only(ann, tmp_path):
    import json
    out = tmp_path / "texts.jsonl"
    out.write_text("".join(line + "\n" for line in ann.read_text().splitlines() if "video" not in json.loads(line)))
    return out


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        _compose("recipe=keye_tiny_lm", "train.lrr=1e-4")
    assert "lrr" in str(e.value.__cause__ or e.value)
    # `+key=value`, the form Hydra's message suggests, gets past Hydra: the typed config refuses it
    with pytest.raises(ValueError, match=r"unknown config keys foo, model\.lm\.xx, train\.lrr: no setting"):
        to_config(_compose("recipe=keye_tiny_lm", "+train.lrr=1", "+foo=1", "+model.lm.xx=2"))


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        _compose("recipe=keye_tiny_lm", "train.lr=fast")
    msg = str(e.value.__cause__ or e.value)
    assert "train.lr" in msg and "fast" in msg


@pytest.mark.parametrize("overrides,world,needle", [
    (["parallel.ep=3"], 3, "parallel.ep (3) must divide model.lm.num_experts (8)"),
    (["parallel.tp=3", "parallel.ep=1"], 3, "parallel.tp (3) must divide model.lm.num_attention_heads (8)"),
    # more TP ranks than KV heads: megatron splits whole KV heads over TP and replicates none (the message named both
    # head counts, 8 of which tp 4 divides, and not what fits)
    (["parallel.tp=4", "parallel.ep=1"], 4, "parallel.tp (4) must divide model.lm.num_query_groups (2, the KV "
                                            "heads): each tensor-parallel rank holds whole KV heads, none is "
                                            "replicated over TP ranks, so this model runs at tp 1, 2; parallel.ep"),
    (["parallel.ep=2"], 3, "world size (3) must be divisible by parallel.etp * parallel.ep * parallel.pp"),
    (["parallel.pp=3", "parallel.ep=1"], 3, "model.lm.num_layers (4) must be divisible by parallel.pp * parallel.vpp"),
    (["train.global_batch_size=6"], 2, "train.global_batch_size (6) must be a multiple of train.micro_batch_size (4)"),
    (["parallel.moe_dispatcher=flex"], 2, "parallel.moe_dispatcher must be one of"),
    (["train.lr_schedule=step"], 2, "train.lr_schedule must be one of"),
    (["model.lm.attention=sliding"], 2, "model.lm.attention variant 'sliding'"),
    (["train.distill.enabled=true"], 2, "train.distill.enabled needs KSA layers"),
    # a stage of a variant the model lacks: refused before any process group (it was refused by each rank building
    # the model, and under pipeline parallelism by a stage that held none of them alone, the others waiting for it)
    (["train.trainable=indexer"], 2, "train.trainable=indexer trains the DSA layers' own parameters, but model.lm has "
                                     "no DSA layer (its attention: dense)"),
    (["train.trainable=summary"], 2, "train.trainable=summary trains the KSA layers' own parameters, but model.lm has "
                                     "no KSA layer (its attention: dense)"),
    (["model.lm.mrope_section=[2,3,4]"], 2, "model.lm.mrope_section [2, 3, 4] must sum to head_dim / 2 (8)"),
    # two counts summing right trained without a word: megatron's RoPE took a rotary pair's channels from two rows
    (["model.lm.mrope_section=[4,4]"], 2, "model.lm.mrope_section [4, 4] must hold 3 counts (rotary channel pairs of "
                                          "the time, height and width rows), got 2"),
    # a negative count summing right built the model and failed in its first forward (RoPE's channel split)
    (["model.lm.mrope_section=[5,-1,4]"], 2, "model.lm.mrope_section [5, -1, 4] must hold counts >= 0"),
    # an odd index dimension built the model and failed in its first forward, in the indexer's RoPE
    (["model.lm.attention=dsa", "model.lm.dsa.index_dim=7"], 2, "model.lm.dsa.index_dim must be even"),
    (["train.profile.steps=-1"], 2, "train.profile.steps must be >= 0 (0: off), got -1"),
    (["train.profile.start=0"], 2, "train.profile.start must be >= 1 (steps count from 1), got 0"),
    (["train.lr=-1"], 2, "train.lr must be >= 0, got -1.0"),
    (["train.warmup_steps=-5"], 2, "train.warmup_steps must be >= 0, got -5"),
    (["train.grad_clip=-1"], 2, "train.grad_clip must be >= 0, got -1.0"),
    (["train.adam_beta2=1.0"], 2, "train.adam_beta2 must be in [0, 1), got 1.0"),
    (["train.adam_eps=0"], 2, "train.adam_eps must be > 0, got 0.0"),
    (["data.seed=-1"], 2, "data.seed must be >= 0, got -1"),
    (["train.profile.steps=2", "train.profile.ranks=[0,9]"], 2,
     "train.profile.ranks [0, 9]: rank 9 not among this run's 2 ranks"),
    (["train.profile.steps=2", "train.profile.start=999"], 2,
     "train.profile.start (999) is past the run's last step (train.steps=60)"),
    (["train.profile.steps=2", "train.profile.ranks=[]"], 2,   # profiled nothing, without a word
     "train.profile.ranks is empty, so train.profile.steps=2 would profile nothing"),
    (["model.lm.init_std=-1"], 2, "model.lm.init_std must be > 0, got -1.0"),
    (["model.lm.moe_aux_loss_coeff=-1"], 2, "model.lm.moe_aux_loss_coeff must be >= 0, got -1.0"),
    # nan passes a sign check (nan < 0 is False) and inf a positive one: moe_aux_loss_coeff=nan trained without load
    # balancing, weight_decay=nan stopped every rank in the optimizer's constructor after the build, init_std=inf made
    # every weight inf; a negative peak_tflops was taken as 0 (the device's measured peak)
    (["model.lm.moe_aux_loss_coeff=nan"], 2, "model.lm.moe_aux_loss_coeff must be a finite number, got nan"),
    (["model.lm.init_std=inf"], 2, "model.lm.init_std must be a finite number, got inf"),
    (["model.lm.attention=dsa", "model.lm.dsa.loss_weight=nan"], 2,
     "model.lm.dsa.loss_weight must be a finite number, got nan"),
    (["train.weight_decay=nan"], 2, "train.weight_decay must be a finite number, got nan"),
    (["train.adam_eps=inf"], 2, "train.adam_eps must be a finite number, got inf"),
    (["train.grad_clip=nan"], 2, "train.grad_clip must be >= 0, got nan"),
    (["train.peak_tflops=-1"], 2, "train.peak_tflops must be >= 0 (0: the device's measured peak), got -1.0"),
    (["train.distill.kl_weight=nan"], 2, "train.distill.kl_weight must be a finite number >= 0, got nan"),
    (["train.vision_lr=nan"], 2, "train.vision_lr must be a finite number >= 0 (or null: train.lr), got nan"),
    (["train.vision_lr=inf"], 2, "train.vision_lr must be a finite number >= 0 (or null: train.lr), got inf"),
    (["train.projector_lr=-1e-4"], 2,
     "train.projector_lr must be a finite number >= 0 (or null: train.lr), got -0.0001"),
    (["data.video.video_tokens_per_second=nan"], 2,
     "VideoDataConfig.video_tokens_per_second = nan: must be a number, not nan"),
    (["train.checkpoint.vision_init_from=/ckpt/keye_vl"], 2, "train.checkpoint.vision_init_from='/ckpt/keye_vl' fills "
                                                             "the vision tower, which this model does not have"),
])
def test_impossible_settings_fail_with_the_numbers(overrides, world, needle):
    with pytest.raises(ValueError) as e:
        _validate("recipe=keye_tiny_lm", *overrides, world_size=world)
    assert needle in str(e.value)


def test_an_interleaved_pipeline_needs_a_multiple_of_pp_micro_batches_per_run_of_its_schedule():
    """megatron's interleaved schedule takes micro-batches in groups of pp per model chunk and raised at the first step,
    the model built, for a step of fewer (or a round of parallel.vit.group): `ValueError: The number of contiguous
    micro-batches in a virtual pipeline stageshould range in [PP=2 , M=1]` on every rank."""
    interleaved = ("parallel.pp=2", "parallel.vpp=2", "parallel.ep=1")
    _validate("recipe=keye_tiny_lm", *interleaved, "train.global_batch_size=8")   # 2 micro-batches of 4 per step
    with pytest.raises(ValueError) as e:
        _validate("recipe=keye_tiny_lm", *interleaved, "train.global_batch_size=4")
    assert str(e.value) == ("parallel.vpp (2) runs megatron's interleaved pipeline schedule, which takes micro-batches "
                            "in groups of parallel.pp (2): the micro-batches per step and data-parallel rank (1 = "
                            "train.global_batch_size / (train.micro_batch_size x 1)) must be a multiple of 2")
    # the multimodal model's 4 ranks: dp 2, 2 micro-batches per step, run in rounds of parallel.vit.group
    _validate("recipe=keye_tiny", "parallel.pp=2", "parallel.vpp=2", world_size=4)
    with pytest.raises(ValueError, match=r"parallel.vit.group \(1\), the micro-batches of each round of a step, "
                                         r"must be a multiple of 2"):
        _validate("recipe=keye_tiny", "parallel.pp=2", "parallel.vpp=2", "parallel.vit.group=1", world_size=4)


def test_a_sequence_that_sequence_parallelism_cannot_split_over_the_tp_ranks_is_refused():
    """Sequence parallelism (on whenever parallel.tp > 1) splits the tokens of a sequence, or of a context-parallel
    rank's share of it, over the TP ranks. A length they do not divide passed the launch and stopped every rank in the
    first step, the model built: `AssertionError: First dimension of the tensor should be divisible by tensor parallel
    size` (megatron's reduce-scatter after the embedding). KSA's summary slots count: 120 text tokens are 135."""
    tp2 = ("parallel=single", "parallel.tp=2")
    with pytest.raises(ValueError) as e:
        _validate("recipe=keye_tiny_lm", *tp2, "train.seq_length=127")
    assert str(e.value) == ("train.seq_length (127) must be divisible by parallel.tp (2): sequence parallelism (on "
                            "whenever parallel.tp > 1) splits its tokens over the 2 tensor-parallel ranks")
    _validate("recipe=keye_tiny_lm", *tp2, "train.seq_length=126")
    with pytest.raises(ValueError, match=r"^train\.seq_length \(120 tokens \+ KSA summaries = 135\) must be divisible "
                                         r"by parallel\.tp \(2\)"):
        _validate("recipe=keye_tiny_ksa", *tp2, "train.seq_length=120")
    _validate("recipe=keye_tiny_ksa", *tp2, "train.seq_length=128")   # 144 with its summaries
    # tp 4 x cp 2 (4 KV heads, so that tp 4 divides them): 132 tokens cut into 4 chunks, but a CP rank's 66 are not
    # divisible by 4
    tp4cp2 = ("parallel=single", "parallel.tp=4", "parallel.cp=2", "model.lm.num_query_groups=4")
    with pytest.raises(ValueError, match=r"^train\.seq_length \(132\) must be divisible by parallel\.cp \* "
                                         r"parallel\.tp = 8: .* splits each context-parallel rank's 66 tokens over "
                                         r"the 4 "):
        _validate("recipe=keye_tiny_lm", *tp4cp2, "train.seq_length=132", world_size=8)
    _validate("recipe=keye_tiny_lm", *tp4cp2, "train.seq_length=136", world_size=8)


@pytest.mark.parametrize("overrides,warning", [
    (["recipe=keye_tiny_lm", "parallel.cp_comm=allgather"], "parallel.cp_comm=allgather is ignored: parallel.cp=1"),
    (["recipe=keye_tiny_lm", "parallel.cp_split=sequence"], "parallel.cp_split=sequence is ignored: parallel.cp=1"),
    # KSA layers run Ulysses whatever cp_comm says, DSA sparse layers all-gather K and V (models/attention/{ksa,dsa}.py)
    (["recipe=keye_tiny_ksa", "parallel.cp=2", "parallel.cp_comm=allgather"],
     "parallel.cp_comm=allgather is ignored: model.lm has no layer that takes it (its attention: ksa"),
    (["recipe=keye_tiny_dsa_sparse", "parallel.cp=2", "parallel.cp_comm=allgather"],
     "parallel.cp_comm=allgather is ignored: model.lm has no layer that takes it (its attention: dsa"),
    # read: dense layers and the DSA dense warm-up take it, and the defaults say nothing
    (["recipe=keye_tiny_lm", "parallel.cp=2", "parallel.cp_comm=allgather", "parallel.cp_split=sequence"], None),
    (["recipe=keye_tiny_dsa_warmup", "parallel.cp=2", "parallel.cp_comm=allgather"], None),
    (["recipe=keye_tiny_ksa", "parallel.cp=2"], None),
])
def test_a_context_parallel_setting_nothing_reads_is_named_as_ignored(overrides, warning):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _validate(*overrides)
    ignored = [str(w.message) for w in seen if "ignored" in str(w.message)]
    assert len(ignored) == (warning is not None) and all(warning in w for w in ignored), ignored


@pytest.mark.parametrize("overrides,warning", [
    # frames are balanced over ranks only where they are spread: the replicated layout encodes all on each LM-input rank
    (["parallel.vit.layout=replicated", "parallel.vit.balance=round_robin"],
     "parallel.vit.balance=round_robin is ignored: parallel.vit.layout=replicated"),
    (["parallel.vit.balance=round_robin"], None),
    (["parallel.vit.layout=replicated"], None),
])
def test_a_vit_balance_the_replicated_layout_does_not_read_is_named_as_ignored(overrides, warning):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _validate("recipe=keye_tiny", *overrides)
    ignored = [str(w.message) for w in seen if "ignored" in str(w.message)]
    assert len(ignored) == (warning is not None) and all(warning in w for w in ignored), ignored


@pytest.mark.parametrize("overrides,warning", [
    # the alignment stage freezes the ViT; the KSA / DSA conversion stages freeze the whole tower; a language model
    # alone has none: the part's own lr is named as unused, and the run goes on (nothing trains at a wrong lr)
    (["recipe=keye_tiny_align", "train.vision_lr=1e-4"],
     "train.vision_lr=0.0001 is not used: the ViT is frozen (train.trainable=projector)"),
    (["recipe=keye_tiny_vl_ksa_distill", "train.projector_lr=1e-4"],
     "train.projector_lr=0.0001 is not used: the projector is frozen (train.trainable=summary)"),
    (["recipe=keye_tiny_lm", "train.vision_lr=1e-4"],
     "train.vision_lr=0.0001 is not used: this model has no vision tower (model.vision.enabled=false)"),
    (["recipe=keye_tiny_align", "train.projector_lr=1e-4"], None),
    (["recipe=keye_tiny", "train.vision_lr=1e-4", "train.projector_lr=2e-4"], None),
])
def test_a_parts_lr_where_that_part_does_not_train_is_named_as_unused(overrides, warning):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _validate(*overrides)
    unused = [str(w.message) for w in seen if "is not used" in str(w.message)]
    assert unused == ([warning] if warning else []), unused


@pytest.mark.parametrize("overrides,warning", [
    # the packs are train.seq_length tokens (data/video_stream.py sets data.video.seq_len to it): a data.video.seq_len
    # set to another length is named (it was dropped without a word: a relaunch with data.video.seq_len=1024 to
    # lengthen the packs logged the change and trained at 512)
    (["recipe=keye_tiny", "data.video.seq_len=1024"],
     "data.video.seq_len=1024 is not used: the video data's packs are train.seq_length's length (512 tokens)"),
    (["recipe=keye_tiny", "train.seq_length=1024"],    # the recipe's data.video.seq_len: named too
     "data.video.seq_len=512 is not used: the video data's packs are train.seq_length's length (1024 tokens)"),
    (["recipe=keye_tiny", "train.seq_length=1024", "data.video.seq_len=1024"], None),
    (["recipe=keye_tiny_lm", "data=text_tiny", "train.micro_batch_size=1"], None),
])
def test_a_video_seq_len_other_than_train_seq_length_is_named_as_unused(overrides, warning):
    test_a_parts_lr_where_that_part_does_not_train_is_named_as_unused(overrides, warning)


def test_a_ksa_chunk_longer_than_the_sequence_is_refused():
    """No chunk completes, so no summary exists: the KSA model was plain causal attention, its summary parameters
    (all that the distillation stage trains) never used."""
    with pytest.raises(ValueError, match=r"model.lm.ksa.chunk \(512\) exceeds train.seq_length \(256\)"):
        _validate("recipe=keye_tiny_ksa_distill", "model.lm.ksa.chunk=512")
    _validate("recipe=keye_tiny_ksa_distill", "model.lm.ksa.chunk=256")  # one chunk per sequence: one summary


def test_a_sequence_too_short_for_the_video_packs_is_refused():
    """The trainer packs video data to train.seq_length (data.video.seq_len is replaced by it): a length that cannot
    hold the smallest video sample passed the launch and stopped the run in its data loader, after the process groups
    and the model were built, naming data.video.seq_len. keye_tiny's smallest: 2 frames x (4 + 12) + 2 = 34 tokens."""
    with pytest.raises(ValueError, match=r"^train\.seq_length \(32\) is the length of the video data's packs, and it "
                                         r"cannot hold even the smallest video sample \(34 tokens"):
        _validate("recipe=keye_tiny", "train.seq_length=32")
    with pytest.raises(ValueError, match=r"^train\.seq_length \(8\) .* must be in \[16, 1048576\]"):
        _validate("recipe=keye_tiny", "train.seq_length=8")
    _validate("recipe=keye_tiny", "train.seq_length=34")   # the smallest sample fits exactly
    # a language model alone on the packed loader's text: the same packs
    with pytest.raises(ValueError, match=r"^train\.seq_length \(20\) is the length of the video data's packs"):
        _validate("recipe=keye_tiny_lm", "data=text_tiny", "train.micro_batch_size=1", "train.seq_length=20")


def test_a_dsa_warmup_stage_on_a_model_without_dsa_is_named_as_ignored():
    with pytest.warns(UserWarning, match="model.lm.dsa.stage=dense_warmup is ignored: model.lm has no DSA layer"):
        _validate("recipe=keye_tiny_lm", "model.lm.dsa.stage=dense_warmup")


def test_a_keep_every_that_misses_the_saves_is_named():
    """Only written checkpoints can be kept: keep_every=75 with a save every 50 steps kept those at 150, 300, ...
    without a word. A multiple of save_interval warns of nothing."""
    import warnings

    with pytest.warns(UserWarning, match=r"^train\.checkpoint\.keep_every=75 is not a multiple of train\.checkpoint\."
                                         r"save_interval=50: .* kept are the ones at multiples of 150$"):
        _validate("recipe=keye_tiny_lm", "train.checkpoint.save_interval=50", "train.checkpoint.keep_every=75")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _validate("recipe=keye_tiny_lm", "train.checkpoint.save_interval=50", "train.checkpoint.keep_every=100")
    assert not [w for w in seen if "keep_every" in str(w.message)]


def test_a_vision_init_std_is_named_as_ignored():
    """model.vision.init_std is read by nothing (the tower keeps torch's default init): a value set was silently
    ignored. The default warns of nothing, nor a model without the tower."""
    import warnings

    with pytest.warns(UserWarning, match=r"^model\.vision\.init_std=0\.5 is ignored: the vision tower starts from"):
        _validate("recipe=keye_tiny", "model.vision.init_std=0.5")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _validate("recipe=keye_tiny")
        _validate("recipe=keye_tiny_lm", "model.vision.init_std=0.5")
    assert not [w for w in seen if "init_std" in str(w.message)]


def test_paths_a_run_reads_are_checked_before_it_starts(tmp_path):
    """train.launch.check_paths (the launcher runs it after validate): shards that are not there and weights that
    are neither a Hugging Face checkpoint nor a run with a complete checkpoint name their setting, and so does a
    Hugging Face directory of another language model; a run directory
    that holds a checkpoint resumes and reads no init_from, so that is not checked then."""
    from train.launch import check_paths

    def cfg(*overrides, world_size=2):
        return _validate("recipe=keye_tiny", f"run_dir={tmp_path / 'run'}", *overrides, world_size=world_size)[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("shards", "long_shards", "eval_shards"):
        extra = ["data.video.long_fraction=0.5"] if name == "long_shards" else []
        with pytest.raises(ValueError, match=rf"^data\.video\.{name}='{empty}': no \.tar shards there"):
            check_paths(cfg(f"data.video.{name}={empty}", *extra))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"")
    check_paths(cfg(f"data.video.shards={tmp_path / 'shards'}"))
    (tmp_path / "shards" / "b.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"data\.video\.eval_shards='.*b\.tar': 1 shard file\(s\) are also training "
                                         r"data \(.*b\.tar, \.\.\.\): held-out data must not be trained on"):
        check_paths(cfg(f"data.video.shards={tmp_path / 'shards'}", f"data.video.eval_shards={tmp_path / 'shards' / 'b.tar'}"))
    # the training folder again through a link: the same files
    (tmp_path / "link").symlink_to(tmp_path / "shards")
    with pytest.raises(ValueError, match=r"data\.video\.eval_shards='.*link': 2 shard file\(s\) are also training "
                                         r"data \(.*shards/a\.tar, \.\.\.\): held-out data must not be trained on"):
        check_paths(cfg(f"data.video.shards={tmp_path / 'shards'}", f"data.video.eval_shards={tmp_path / 'link'}"))
    with pytest.raises(ValueError, match=r"data\.video\.shards='.*shards,.*link': 2 shard file\(s\) are named twice, "
                                         r"through a link \(.*link/a\.tar and .*shards/a\.tar, \.\.\.\)"):
        check_paths(cfg(f"data.video.shards='{tmp_path / 'shards'},{tmp_path / 'link'}'"))
    for name in ("init_from", "vision_init_from"):
        with pytest.raises(ValueError, match=rf"train\.checkpoint\.{name}='/nowhere' is neither a Hugging Face "
                                             r"checkpoint .* nor a run directory .*: there is no such path"):
            check_paths(cfg(f"train.checkpoint.{name}=/nowhere"))
        with pytest.raises(ValueError, match=rf"train\.checkpoint\.{name}='{empty}' is neither.*COMPLETE\.json\)$"):
            check_paths(cfg(f"train.checkpoint.{name}={empty}"))
    # a Hugging Face directory's language model must be model.lm (its sizes, its DSA indexers): its config.json is
    # read, the weights are not opened here
    import json

    from models.hf.qwen3_moe import hf_config_from_lm

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config_from_lm(cfg().model.lm)))
    (hf / "model.safetensors").write_bytes(b"")
    check_paths(cfg(f"train.checkpoint.init_from={hf}"))
    with pytest.raises(ValueError, match=rf"^train\.checkpoint\.init_from='{hf}': HF config hidden_size=.* does not "
                                         r"match model\.lm\.hidden_size="):
        check_paths(cfg(f"train.checkpoint.init_from={hf}", "model.lm.hidden_size=256"))
    done = tmp_path / "run" / "checkpoints" / "step_000004"  # a complete checkpoint (no files listed)
    done.mkdir(parents=True)
    (done / "COMPLETE.json").write_text('{"step": 4, "files": {}}')
    check_paths(cfg(f"train.checkpoint.init_from={tmp_path / 'run'}"))  # another run's checkpoint as the source
    check_paths(cfg("train.checkpoint.init_from=/nowhere"))  # this run resumes: init_from is not read


@pytest.mark.parametrize("override,world,needle", [
    ("train.lrr=1", 1, "lrr"),
    ("train.lr=fast", 1, "train.lr"),
    ("parallel.ep=3", 3, "parallel.ep (3) must divide model.lm.num_experts (8)"),
    ("train.checkpoint.init_from=/nowhere", 2, "train.checkpoint.init_from='/nowhere' is neither"),
])
def test_launcher_exits_before_building_anything(tmp_path, override, world, needle):
    """launch/pretrain.py as a process of its own (forked from the warm one: tests/launch_util.run_script)."""
    from tests.launch_util import run_script

    run_dir = tmp_path / "run"
    env = {**os.environ, "WORLD_SIZE": str(world)}
    proc = run_script(REPO / "launch" / "pretrain.py", ["recipe=keye_tiny_lm", override, f"run_dir={run_dir}"],
                      timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr + proc.stdout
    assert not run_dir.exists(), "nothing may be written before the config is valid"
    assert "process group" not in (proc.stderr + proc.stdout).lower()


def test_wandb_missing_is_a_config_error_before_the_build(tmp_path, monkeypatch):
    """wandb logs every run unless train.wandb.enabled=false; where it is not installed, rank 0 stopped on
    `import wandb` with a traceback once the process groups and the model were built (the other ranks waiting in
    their first step). The launcher exits 2 first, naming the setting. A sitecustomize hides the installed wandb, as
    Python does a package it cannot find."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env.update(WORLD_SIZE="1", PYTHONPATH=os.pathsep.join([str(hide), str(REPO), env.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "recipe=keye_tiny_lm", "parallel.ep=1",
                           "train.wandb.mode=offline", f"run_dir={run_dir}"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("config error: train.wandb.enabled=true (train.wandb.mode=offline) logs to wandb, which is not installed "
            "here: pip install wandb, or train.wandb.enabled=false") in proc.stderr
    assert not run_dir.exists()
    from train.launch import check_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    check_wandb(_validate("recipe=keye_tiny_lm", "train.wandb.enabled=false")[0])   # turned off: not needed
    check_wandb(_validate("recipe=keye_tiny_lm", "train.wandb.mode=disabled")[0])
    with pytest.raises(ValueError, match=r"^train\.wandb\.enabled=true \(train\.wandb\.mode=auto\)"):
        check_wandb(_validate("recipe=keye_tiny_lm")[0])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    check_wandb(_validate("recipe=keye_tiny_lm")[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton kernels run on a GPU: nothing to refuse there")
def test_settings_this_machine_cannot_run_are_refused_before_the_build(tmp_path, monkeypatch):
    """model.lm.experts_impl=triton (or a KSA / DSA backend=triton) on a CPU-only machine built the process groups and
    the model and failed in the first forward on every rank ("0 active drivers" for the experts); the launcher exits
    2 before, naming the setting. Under TRITON_INTERPRET=1 (the kernel tests' interpreter) they run. Likewise
    train.precision=bf16 on CPU."""
    from tests.launch_util import run_script

    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # bf16 was refused by the trainer, once the process groups existed and the run directory held its logs. The
    # launcher runs as a process of its own, forked from the warm one (tests/launch_util.run_script), whose kernels
    # were imported without the interpreter, as a fresh process's are without TRITON_INTERPRET
    for setting, needle in (("model.lm.experts_impl=triton", "model.lm.experts_impl=triton: Triton kernels need a "
                                                             "CUDA GPU"),
                            ("train.precision=bf16", "train.precision=bf16 needs a GPU")):
        proc = run_script(REPO / "launch" / "pretrain.py",
                          ["recipe=keye_tiny_lm", "parallel.ep=1", setting, "train.steps=2", "train.warmup_steps=0",
                           "train.wandb.enabled=false", f"run_dir={run_dir}"],
                          timeout=300, env={**env, "WORLD_SIZE": "1"}, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"config error: {needle}" in proc.stderr
        assert not run_dir.exists()
    from train.launch import check_device

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for recipe, setting in (("keye_tiny_ksa", "model.lm.ksa.backend=triton"),
                            ("keye_tiny_dsa_sparse", "model.lm.dsa.backend=triton")):
        with pytest.raises(ValueError, match=rf"^{setting}: Triton kernels need a CUDA GPU"):
            check_device(_validate(f"recipe={recipe}", setting)[0], cuda=False)
        check_device(_validate(f"recipe={recipe}", setting)[0], cuda=True)
    check_device(_validate("recipe=keye_tiny_lm", "model.lm.dsa.backend=triton")[0], cuda=False)  # no DSA layer
    # FlexAttention has no backward on the CPU: the first step raised torch's NotImplementedError, after the model was
    # built; it trains on a GPU, and forward alone (train.eval.only) runs on the CPU
    with pytest.raises(ValueError, match=r"^model\.lm\.ksa\.backend=flex: FlexAttention has no backward on the CPU"):
        check_device(_validate("recipe=keye_tiny_ksa", "model.lm.ksa.backend=flex")[0], cuda=False)
    check_device(_validate("recipe=keye_tiny_ksa", "model.lm.ksa.backend=flex")[0], cuda=True)
    from train.config import to_config
    from train.launch import compose_config

    scoring = ["recipe=keye_tiny_ksa", "model.lm.ksa.backend=flex", "train.eval.only=true"]  # validate: a checkpoint
    check_device(to_config(compose_config(scoring)), cuda=False)
    check_device(_validate("recipe=keye_tiny_lm", "model.lm.ksa.backend=flex")[0], cuda=False)  # no KSA layer
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_device(_validate("recipe=keye_tiny_lm", "model.lm.experts_impl=triton")[0], cuda=False)
    with pytest.raises(ValueError, match=r"^train\.precision=bf16 needs a GPU"):
        check_device(_validate("recipe=keye_tiny_lm", "train.precision=bf16")[0], cuda=False)


@pytest.mark.parametrize("stage,cp,seq,long_fraction", [("8k", 1, 8192, 0.0), ("32k", 2, 32768, 0.25),
                                                         ("64k", 4, 65536, 1 / 3), ("256k", 8, 262144, 0.5)])
def test_long_context_curriculum_recipes_validate_on_one_node(stage, cp, seq, long_fraction):
    paths = ["data.video.shards=/data/shards"] + (["data.video.long_shards=/data/long"] if long_fraction else [])
    cfg, layout = _validate(f"recipe=keye_30b_a3b_ctx_{stage}", *paths, world_size=8)
    assert layout.cp == cp and cfg.train.seq_length == seq and cfg.model.lm.max_position_embeddings >= seq
    assert cfg.model.vision.enabled and (cfg.train.trainable == "projector") == (stage == "8k")
    assert cfg.data.video.long_fraction == pytest.approx(long_fraction)     # the long:short data mix
    assert cfg.data.video.long_shards == ("/data/long" if long_fraction else "")
    if long_fraction:                      # the long source is a REQUIRED path, like data.video.shards
        with pytest.raises(ValueError, match="data.video.long_shards is required"):
            _validate(f"recipe=keye_30b_a3b_ctx_{stage}", "data.video.shards=/data/shards", world_size=8)
    with pytest.raises(ConfigCompositionException):                         # unknown keys are errors
        _compose(f"recipe=keye_30b_a3b_ctx_{stage}", "data.video.long_short_ratio=0.5")


def test_dsa_stage_recipes_follow_deepseek_at_128k_on_one_node():
    """DeepSeek-V3.2's published DSA stages: warm-up 1000 steps x 16 x 128K tokens (2.1B) at lr 1e-3, indexers
    only; sparse 15000 x 480 x 128K (943.7B) at 7.3e-6, everything. At 128K, not 8K: at 32K and below a DSA layer is
    slower than the trainer's dense attention (bench/RESULTS.md, tenth round), so the stages run where DSA pays.
    Both train the multimodal model on the curriculum's video data, continuing the 256K stage: its ViT, its RoPE
    (theta 1e7, 262,144 positions) and its long:short mix, with both video paths left to the user."""
    paths = ["data.video.shards=/data/shards", "data.video.long_shards=/data/long"]
    warm, layout = _validate("recipe=keye_30b_a3b_dsa_warmup", *paths, world_size=8)
    sparse, _ = _validate("recipe=keye_30b_a3b_dsa_sparse", *paths, world_size=8)
    last, _ = _validate("recipe=keye_30b_a3b_ctx_256k", *paths, world_size=8)
    for cfg in (warm, sparse):
        assert cfg.train.seq_length == 131072 and cfg.model.lm.attention == "dsa" and cfg.model.lm.dsa.topk == 2048
        assert cfg.model.vision == last.model.vision and cfg.model.vision.enabled
        assert (cfg.model.lm.rope_theta, cfg.model.lm.max_position_embeddings) == (1e7, 262144)
        # the 256K stage's language model but for its attention
        assert dataclasses.replace(cfg.model.lm, attention="dense", dsa=last.model.lm.dsa) == last.model.lm
        assert cfg.data.kind == "video" and cfg.data.video.seq_len == 131072
        assert cfg.data.video.long_fraction == last.data.video.long_fraction == 0.5
        assert cfg.data.video.max_video_tokens < cfg.data.video.seq_len
    for stage in ("warmup", "sparse"):
        with pytest.raises(ValueError, match=r"data\.video\.shards is required.*data\.video\.long_shards is required"):
            _validate(f"recipe=keye_30b_a3b_dsa_{stage}", world_size=8)
    assert layout.cp == 4 and layout.dp == 2
    assert (warm.model.lm.dsa.stage, warm.train.trainable, warm.train.lr) == ("dense_warmup", "indexer", 1e-3)
    assert warm.train.steps * warm.train.global_batch_size * warm.train.seq_length == 1000 * 16 * 131072
    assert (sparse.model.lm.dsa.stage, sparse.train.trainable, sparse.train.lr) == ("sparse", "all", 7.3e-6)
    assert sparse.train.steps * sparse.train.global_batch_size * sparse.train.seq_length == 15000 * 480 * 131072


def test_ksa_stage_recipes_convert_the_multimodal_model_on_its_video_data():
    """The three KSA conversion stages keep Keye-VL's ViT (the dense keye_30b_a3b run's, which stage 1 distils
    from) and train on video: stage 1 distils with only the summary parameters training, stage 2 unfreezes
    everything, stage 3 extends to 32K with the 32K curriculum stage's long:short mix."""
    paths = ["data.video.shards=/data/shards", "data.video.long_shards=/data/long"]
    dense, _ = _validate("recipe=keye_30b_a3b", paths[0], world_size=8)
    stages = [_validate(f"recipe=keye_30b_a3b_ksa_stage{i}", *paths, world_size=8)[0] for i in (1, 2, 3)]
    ctx_32k, _ = _validate("recipe=keye_30b_a3b_ctx_32k", *paths, world_size=8)
    for cfg in stages:
        assert cfg.model.vision == dense.model.vision and cfg.model.lm.attention == "ksa"
        assert cfg.model.lm.ksa.windows == [128, 128, 128, 1024] and cfg.data.kind == "video"
    assert (stages[0].train.trainable, stages[0].train.distill.enabled) == ("summary", True)
    assert [c.train.trainable for c in stages[1:]] == ["all", "all"] and not stages[1].train.distill.enabled
    assert stages[2].train.seq_length == stages[2].data.video.seq_len == 32768
    assert stages[2].data.video.long_fraction == ctx_32k.data.video.long_fraction
    with pytest.raises(ValueError, match=r"data\.video\.shards is required"):
        _validate("recipe=keye_30b_a3b_ksa_stage1", world_size=8)


# Qwen3-30B-A3B's config.json as published on the Hugging Face hub (the fields check_hf_config reads)
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
    "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936}


@pytest.mark.parametrize("recipe", ["keye_30b_a3b_align", "keye_30b_a3b_ctx_8k", "keye_30b_a3b", "keye_30b_a3b_lm"])
def test_the_recipes_that_start_from_qwen3_30b_a3b_take_its_published_config(tmp_path, recipe):
    """The stages a user starts from the published language model (`train.checkpoint.init_from=<its directory>`,
    README "From Hugging Face"; the projector alignment freezes it) are that model: its RoPE base 1e6 included,
    which the recipes had at 1e7, so the launch stopped on `HF config rope_theta=1000000.0 does not match
    model.lm.rope_theta=10000000.0`. `launch/convert.py import ... --model keye_30b_a3b` checks the preset alone."""
    from launch.convert import model_config
    from models.hf.qwen3_moe import check_hf_config
    from train.launch import check_hf_model

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    cfg = to_config(_compose(f"recipe={recipe}", "data.video.shards=/data/shards"))
    check_hf_model(str(tmp_path), cfg.model.lm)
    check_hf_config(QWEN3_30B_A3B, model_config("keye_30b_a3b", []))   # what `convert.py import --model` checks


def test_a_recipe_whose_video_paths_are_unset_names_them_first():
    """The long-context recipes leave both video paths to the user (REQUIRED). Left unset, the run stops on them,
    before the layout is checked against the world size, naming each with its override; earlier this surfaced as
    'long_shards names the same shards as shards' (both placeholders compared as paths). Text data ignores them."""
    from data.video.config import UnsetPathError

    with pytest.raises(UnsetPathError, match=r"data\.video\.shards is required.*; and data\.video\.long_shards is "
                                             r"required: .*long_fraction=0\.5") as unset:
        _validate("recipe=keye_30b_a3b_ctx_256k", world_size=1)
    assert unset.value.settings == ("data.video.shards", "data.video.long_shards")
    with pytest.raises(UnsetPathError, match=r"^data\.video\.shards is required"):
        _validate("recipe=keye_30b_a3b", world_size=1)
    cfg = to_config(_compose("recipe=keye_30b_a3b_ctx_256k", "data=synthetic_tokens"))
    assert cfg.data.kind == "synthetic_tokens" and cfg.data.video.long_shards == "REQUIRED"


H200 = 139.8 * 1024 ** 3  # torch.cuda.get_device_properties(0).total_memory of the lent H200s


def test_memory_check_stops_a_layout_predicted_beyond_the_gpu_and_names_what_fits():
    """The 30B recipe with selective recompute on one 8-GPU node is predicted at 146.3 GiB per GPU (its vision tower
    included): on an H200 the check stops it before the model is built and names full recompute (91.7 GiB); with
    warn it only reports."""
    from train.launch import check_memory

    shards = "data.video.shards=/data/shards"  # a path is only checked when the data is read
    cfg, layout = _validate("recipe=keye_30b_a3b", shards, "parallel.recompute=selective", world_size=8)
    with pytest.raises(ValueError,
                       match=r"146\.3 GiB.*largest: optimizer.*139\.8 GiB.*parallel\.recompute=full: 91\.7 GiB"):
        check_memory(cfg, layout, H200)
    cfg, layout = _validate("recipe=keye_30b_a3b", shards, "parallel.recompute=selective", "train.memory_check=warn",
                            world_size=8)
    assert "parallel.offload=activations" in check_memory(cfg, layout, H200)
    cfg, layout = _validate("recipe=keye_30b_a3b", shards, world_size=8)
    assert layout.recompute == "full" and check_memory(cfg, layout, H200) is None
    with pytest.raises(ValueError, match="train.memory_check must be one of"):
        _validate("recipe=keye_tiny_lm", "train.memory_check=maybe")


def test_memory_check_judges_the_heaviest_pipeline_rank_even_a_middle_one():
    """12 dense then 36 DSA layers of the 30B model at pp 4 x tp 4, 48K tokens: pipeline rank 1 holds 3 micro-batches
    of 12 DSA layers (137.1 GiB predicted), more than rank 0's 4 of 12 dense layers (108.7 GiB) and rank 3's one. The
    check judged the first and the last rank only and let the run start on an H200 (108.7 GiB, 119.5 with the margin);
    it now stops it, naming the rank (parallel/memory.py evaluates every pipeline rank)."""
    from train.launch import check_memory

    layers = "[" + ",".join(["dense"] * 12 + ["dsa"] * 36) + "]"
    cfg, layout = _validate("recipe=keye_30b_a3b_lm", "model=keye_30b_a3b_dsa",
                            f"model.lm.attention_per_layer={layers}", "parallel.pp=4", "parallel.tp=4", "parallel.recompute=selective",
                            "train.seq_length=49152", world_size=32)
    with pytest.raises(ValueError, match=r"137\.1 GiB \(pipeline rank 1 of 0-3, the heaviest\) \(150\.8 with"):
        check_memory(cfg, layout, H200)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (REPO / "recipes/recipe").glob("keye_30b_a3b*.yaml")))
def test_every_30b_recipe_is_predicted_to_fit_an_h200(recipe):
    """Each Keye-30B-A3B recipe on the node it is written for (8 GPUs), with the estimate's 10% fragmentation
    margin: what the memory check asks before a run. Placeholder shard paths where a recipe reads video. The
    estimate counts the vision tower of the multimodal recipes (weights, optimizer, the frames and embeddings of
    a vision phase); the DSA sparse stage's 240 sequences per GPU and step fit in rounds of 16
    (parallel.vit.group), and all at once are stopped."""
    from train.launch import check_memory

    video = "video" in (REPO / f"recipes/recipe/{recipe}.yaml").read_text() or recipe in ("keye_30b_a3b_align",)
    paths = ["data.video.shards=/data/shards", "data.video.long_shards=/data/long"] if video else []
    cfg, layout = _validate(f"recipe={recipe}", *paths, world_size=8)
    assert check_memory(cfg, layout, H200) is None
    if cfg.parallel.vit.group:
        cfg, layout = _validate(f"recipe={recipe}", *paths, "parallel.vit.group=0", world_size=8)
        with pytest.raises(ValueError, match="largest: visual embeddings.*smaller parallel.vit.group.* 240 micro"):
            check_memory(cfg, layout, H200)


def test_memory_cli_prints_the_estimate_of_a_recipe_whose_data_paths_are_left_to_fill():
    """launch/memory.py reads no data file: a long-context recipe that leaves its video paths to the user is
    estimated (with stand-in paths, said so) instead of stopping on the paths; other errors still stop it. The CLI runs
    as a process of its own, forked from the warm one (tests/launch_util.run_script)."""
    from tests.launch_util import run_script

    out = run_script(REPO / "launch/memory.py", ["recipe=keye_30b_a3b_ctx_32k"], cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(data.video.shards and data.video.long_shards left to set" in out.stdout
    assert "predicted peak (allocated)" in out.stdout
    assert "cp 2" in out.stdout and "recompute full" in out.stdout
    bad = run_script(REPO / "launch/memory.py", ["recipe=keye_30b_a3b_ctx_32k", "train.micro_batch_size=2"], cwd=REPO,
                     timeout=120)
    assert bad.returncode == 2 and "video data packs one sequence per micro-batch" in bad.stderr, bad.stderr[-2000:]


def _run_dir_of(tmp_path: Path, name: str, *overrides) -> Path:
    """A run directory whose one checkpoint records the resolved config of `overrides` as training saves it (its
    common state's "config"; no tensors, which the launcher's checks do not read)."""
    import json

    import torch

    cfg, _ = _validate(*overrides)
    step = tmp_path / name / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    (step / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                    "common_backend": "torch", "common_backend_version": 1}))
    torch.save({"common": {"step": 2, "config": dataclasses.asdict(cfg)}}, step / "common.pt")
    (step / "COMPLETE.json").write_text(json.dumps({"step": 2, "files": {}}))
    return tmp_path / name


def test_a_checkpoint_from_before_a_model_setting_existed_resumes_where_it_is_at_its_default(tmp_path):
    """A checkpoint written before a model setting joined the schema records no value for it: a resume that leaves
    it at its default is the model that checkpoint trained. The launcher's model check stopped it (`model.lm.X is
    '<absent>' there, ... here`) while the trainer's log of changed settings already read the rule; a value other
    than the default still stops it, naming the setting."""
    run = _run_dir_of(tmp_path, "old", "recipe=keye_tiny_lm")
    common = run / "checkpoints" / "step_000002" / "common.pt"
    saved = torch.load(common, weights_only=False)
    default = dataclasses.asdict(Config())["model"]["lm"]
    lm = saved["common"]["config"]["model"]["lm"]
    key = "norm_eps"                          # at its default in the tiny LM recipe, and not free on resume
    assert lm[key] == default[key] and f"lm.{key}" not in MODEL_KEYS_FREE_ON_RESUME
    del lm[key]
    torch.save(saved, common)
    _validate("recipe=keye_tiny_lm", f"run_dir={run}")
    with pytest.raises(ValueError, match=rf"model\.lm\.{key} is '<absent>' there, 0\.001 here"):
        _validate("recipe=keye_tiny_lm", f"run_dir={run}", f"model.lm.{key}=1e-3")


def test_scoring_a_run_directory_with_another_model_says_it_scores(tmp_path):
    """train.eval.only with a model setting other than the run directory's checkpoint: refused, as a resume is, but
    the message said "a run directory with a checkpoint is resumed" and offered init_from, which an eval-only launch
    does not train from."""
    run = _run_dir_of(tmp_path, "sparse", "recipe=keye_tiny_dsa_sparse")
    with pytest.raises(ValueError, match=r"of another model, and train\.eval\.only scores a run directory's "
                                         r"checkpoints with the model they trained: model\.lm\.dsa\.topk is 32 "
                                         r"there, 16 here\. Score it with its own model settings$"):
        _validate("recipe=keye_tiny_dsa_sparse", f"run_dir={run}", "train.eval.only=true", "model.lm.dsa.topk=16")
    with pytest.raises(ValueError, match=r"a run directory with a checkpoint is resumed: model\.lm\.dsa\.topk"):
        _validate("recipe=keye_tiny_dsa_sparse", f"run_dir={run}", "model.lm.dsa.topk=16")


@pytest.mark.parametrize("stage", ["keye_tiny_vl_dsa_warmup", "keye_tiny_vl_ksa_distill", "keye_tiny_align"])
def test_a_frozen_language_model_keeps_the_rope_base_of_its_source(tmp_path, stage):
    """A stage that keeps the language model frozen (trainable indexer, summary, projector) started from a run at
    another RoPE base: its frozen layers would read every position moved (the tiny warm-up's first loss 1.85 against
    the source's 1.15), and it ran without a word. Now a config error naming both bases. A stage that trains the
    whole model may move to a new base (the 64K curriculum stage does), and the same base passes."""
    from train.launch import check_paths

    source = _run_dir_of(tmp_path, "dense", "recipe=keye_tiny")          # rope_theta 1e7, the tiny preset's
    start = [f"recipe={stage}", f"run_dir={tmp_path / 'new'}", f"train.checkpoint.init_from={source}"]
    check_paths(_validate(*start)[0])
    with pytest.raises(ValueError, match=r"init_from='.*/dense' holds a model trained at model\.lm\.rope_theta=1e\+07, "
                                         r"and train\.trainable=\w+ keeps its language model frozen at "
                                         r"model\.lm\.rope_theta=1e\+06 here"):
        check_paths(_validate(*start, "model.lm.rope_theta=1e6")[0])
    check_paths(_validate(*start, "model.lm.rope_theta=1e6", "train.trainable=all", "train.distill.enabled=false")[0])


def test_init_from_a_model_of_other_sizes_stops_before_the_build(tmp_path):
    """A run directory given as train.checkpoint.init_from (a distillation's teacher, a stage's start) or
    vision_init_from holds a model of other sizes: the launcher names the settings that differ, where loading it
    stopped every rank with megatron's shape-mismatch traceback once the model was built. A dense model starting a
    KSA or DSA one, or a language model a multimodal one, is not such a mismatch."""
    from train.launch import check_paths

    lm = _run_dir_of(tmp_path, "lm", "recipe=keye_tiny_lm")
    vl = _run_dir_of(tmp_path, "vl", "recipe=keye_tiny")
    distill = ["recipe=keye_tiny_ksa_distill", f"run_dir={tmp_path / 'new'}", f"train.checkpoint.init_from={lm}"]
    check_paths(_validate(*distill)[0])                                   # dense -> KSA, same sizes
    with pytest.raises(ValueError, match=r"train\.checkpoint\.init_from='.*/lm' holds a checkpoint \(step 2, .*\) of "
                                         r"a model of other sizes: model\.lm\.num_layers is 4 there, 3 here; "
                                         r"model\.lm\.hidden_size is 128 there, 96 here"):
        check_paths(_validate(*distill, "model.lm.hidden_size=96", "model.lm.num_layers=3")[0])
    vl_distill = ["recipe=keye_tiny_vl_ksa_distill", f"run_dir={tmp_path / 'new'}", f"train.checkpoint.init_from={vl}"]
    check_paths(_validate(*vl_distill)[0])
    with pytest.raises(ValueError, match=r"model\.vision\.hidden is \d+ there, 48 here"):
        check_paths(_validate(*vl_distill, "model.vision.hidden=48")[0])
    # the vision tower from vision_init_from: its sizes are judged against that source, not init_from's
    with pytest.raises(ValueError, match=r"train\.checkpoint\.vision_init_from='.*/vl' .*model\.vision\.depth is \d+ "
                                         r"there, 1 here"):
        check_paths(_validate(*vl_distill, f"train.checkpoint.vision_init_from={vl}", "model.vision.depth=1")[0])
    # a language model's run starts a multimodal one: no vision tower there to compare
    check_paths(_validate("recipe=keye_tiny", f"run_dir={tmp_path / 'new'}", f"train.checkpoint.init_from={lm}")[0])


def test_init_from_an_import_of_other_sizes_stops_before_the_build(tmp_path):
    """`launch/convert.py import` records the model in its checkpoint's common state as model_lm / model_vision (no
    run config): a run from it with the recipe's sizes (keye_tiny's LM is 128 wide, the tiny Keye-VL import's 64)
    stopped every rank with megatron's 'Global shape mismatch for loaded (torch.Size([2, 64])) and expected
    ((4, 128)) tensor for key decoder.layers.input_layernorm.weight' once the model was built. Now the launcher
    names the settings that differ; the import's own sizes pass."""
    from train.launch import check_paths

    tiny = ["model.lm.num_layers=2", "model.lm.hidden_size=64", "model.lm.num_attention_heads=4",
            "model.lm.head_dim=16", "model.lm.moe_ffn_hidden_size=32"]
    src, _ = _validate("recipe=keye_tiny", *tiny)
    step = tmp_path / "import" / "checkpoints" / "step_000000"
    step.mkdir(parents=True)
    (step / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                    "common_backend": "torch", "common_backend_version": 1}))
    vision = {k: v for k, v in dataclasses.asdict(src.model.vision).items() if k != "enabled"}
    torch.save({"common": {"step": 0, "recipe": "hf_import", "model_lm": dataclasses.asdict(src.model.lm),
                           "model_vision": vision}}, step / "common.pt")
    (step / "COMPLETE.json").write_text(json.dumps({"step": 0, "files": {}}))
    run = ["recipe=keye_tiny", f"run_dir={tmp_path / 'new'}", f"train.checkpoint.init_from={tmp_path / 'import'}"]
    check_paths(_validate(*run, *tiny)[0])
    with pytest.raises(ValueError, match=r"init_from='.*/import' holds a checkpoint \(step 0, .*\) of a model of "
                                         r"other sizes: model\.lm\.num_layers is 2 there, 4 here; "
                                         r"model\.lm\.hidden_size is 64 there, 128 here"):
        check_paths(_validate(*run)[0])
    with pytest.raises(ValueError, match=r"model\.vision\.depth is 2 there, 1 here"):
        check_paths(_validate(*run, *tiny, "model.vision.depth=1")[0])


def test_distillation_trains_only_the_summary_parameters_so_its_teacher_stays_the_dense_model(tmp_path):
    """The distillation's teacher is the model's own weights with dense attention (train/distill.py). With
    train.trainable=all (or projector) those weights trained with the student, so the teacher moved away from the
    dense model the run started from, and the stage ran without a word; now a config error before any process group."""
    stage = ["recipe=keye_tiny_vl_ksa_distill", f"run_dir={tmp_path / 'new'}"]
    _validate(*stage)
    for trainable in ("all", "projector"):
        with pytest.raises(ValueError, match=rf"train\.distill\.enabled needs train\.trainable=summary \(got "
                                             rf"{trainable}\): the teacher is this model's own weights"):
            _validate(*stage, f"train.trainable={trainable}")
    _validate(*stage, "train.trainable=all", "train.distill.enabled=false")  # stage 2


def test_a_distillation_from_a_ksa_run_that_trained_its_weights_is_refused(tmp_path):
    """init_from a KSA run whose language model trained under KSA attention (keye_tiny_ksa, a stage-2 run): the
    teacher would be that KSA model read with dense attention, not a dense model, and the stage ran without a word.
    A stage-1 run (only its summary parameters trained: its dense weights are its source's) and a dense run pass."""
    from train.launch import check_paths

    ksa = _run_dir_of(tmp_path, "ksa", "recipe=keye_tiny_ksa", "train.checkpoint.init_from=/data/dense_lm")
    stage1 = _run_dir_of(tmp_path, "stage1", "recipe=keye_tiny_ksa_distill")
    dense = _run_dir_of(tmp_path, "dense", "recipe=keye_tiny_lm")
    distill = ["recipe=keye_tiny_ksa_distill", f"run_dir={tmp_path / 'new'}"]
    with pytest.raises(ValueError, match=r"train\.checkpoint\.init_from='.*/ksa' holds a KSA model \(step 2, .*\) "
                                         r"whose run trained train\.trainable=all with KSA attention: the "
                                         r"distillation's teacher.*would not be a dense model\. Distil from a dense "
                                         r"run \(that run started from '/data/dense_lm'\)"):
        check_paths(_validate(*distill, f"train.checkpoint.init_from={ksa}")[0])
    for source in (stage1, dense):
        check_paths(_validate(*distill, f"train.checkpoint.init_from={source}")[0])
    # the same KSA run starts a stage that does not distil (stage 2 from it)
    check_paths(_validate("recipe=keye_tiny_ksa", f"run_dir={tmp_path / 'new'}",
                          f"train.checkpoint.init_from={ksa}")[0])


def test_a_distillation_from_an_export_of_a_ksa_run_that_trained_its_weights_is_refused(tmp_path):
    """The run-directory rule above, for a Hugging Face export of such a run: the export records how its run trained
    (keye_export.json "trained", from the checkpoint's recorded config), and a distillation from an export whose run
    trained under KSA is refused; a stage-1 export passes; a KSA directory without that record (another program's, or
    a copy of the weights alone) is taken with a warning; a dense directory without a word. It was taken silently."""
    import importlib.util
    import warnings

    from models.hf.qwen3_moe import hf_config_from_lm
    from train.launch import check_paths

    spec = importlib.util.spec_from_file_location("convert_cli", REPO / "launch" / "convert.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    ksa_run, _ = _validate("recipe=keye_tiny_ksa")
    assert convert._trained({"config": dataclasses.asdict(ksa_run)}) == {"trainable": "all", "attention": "ksa"}
    assert convert._trained({"model_lm": {}}) is None      # a checkpoint `import` wrote records no run

    distill = ["recipe=keye_tiny_ksa_distill", f"run_dir={tmp_path / 'new'}"]
    lm = _validate(*distill)[0].model.lm

    def hf_dir(name, lm, trained=None, record=True):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(hf_config_from_lm(lm)))
        (d / "model.safetensors").write_bytes(b"")     # the launch's checks read config.json alone
        if record:
            convert._record_export(d, tmp_path / "runs" / name / "checkpoints" / "step_000002", complete=True,
                                   trained=trained)
        return str(d)

    stage2 = hf_dir("stage2", lm, {"trainable": "all", "attention": "ksa"})
    with pytest.raises(ValueError, match=r"init_from='.*/stage2' is an export of a KSA model \(of .*/runs/stage2/"
                                         r"checkpoints/step_000002\) whose run trained train\.trainable=all with KSA "
                                         r"attention: the distillation's teacher.*would not be a dense model"):
        check_paths(_validate(*distill, f"train.checkpoint.init_from={stage2}")[0])
    check_paths(_validate("recipe=keye_tiny_ksa", f"run_dir={tmp_path / 'new'}",
                          f"train.checkpoint.init_from={stage2}")[0])       # stage 2 from it: no distillation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_paths(_validate(*distill, "train.checkpoint.init_from=" + hf_dir("stage1", lm, {"trainable": "summary",
                                                                                           "attention": "ksa"}))[0])
        dense = dataclasses.replace(lm, attention="dense", attention_per_layer=[])
        check_paths(_validate(*distill, "train.checkpoint.init_from=" + hf_dir("dense", dense, record=False))[0])
    for name, kw, why in (("copy", {"record": False}, "keye_export.json is not there"),
                          ("older", {}, "keye_export.json names none")):
        with pytest.warns(UserWarning, match=rf"holds KSA layers and no record of how they trained \({why}\)"):
            check_paths(_validate(*distill, "train.checkpoint.init_from=" + hf_dir(name, lm, **kw))[0])


def test_init_from_a_run_whose_sparse_layers_or_summaries_differ_stops_before_the_build(tmp_path):
    """A DSA or KSA layer's own tensors are stacked over that variant's layers: from a warm-up with DSA on layers 0
    and 2, a sparse stage with DSA on 1 and 3 loaded layer 0's indexer into layer 1 and layer 2's into layer 3 without
    a word, and one with another count of DSA (or KSA) layers, or another model.lm.ksa.num_summary, stopped every rank
    with megatron's shape mismatch once the model was built. Now config errors naming the layers or the setting; the
    source's own layout passes (the Hugging Face route refused them already)."""
    from train.launch import check_paths

    warm = _run_dir_of(tmp_path, "warm", "recipe=keye_tiny_dsa_warmup",
                       "model.lm.attention_per_layer=[dsa,dense,dsa,dense]")
    ksa = _run_dir_of(tmp_path, "ksa", "recipe=keye_tiny_ksa")
    new = f"run_dir={tmp_path / 'new'}"
    check_paths(_validate("recipe=keye_tiny_dsa_sparse", new, f"train.checkpoint.init_from={warm}",
                          "model.lm.attention_per_layer=[dsa,dense,dsa,dense]")[0])
    for layers, want in (("[dense,dsa,dense,dsa]", r"\[1, 3\]"), ("[dsa,dsa,dsa,dense]", r"\[0, 1, 2\]")):
        with pytest.raises(ValueError, match=rf"init_from='.*/warm' holds a checkpoint \(step 2, .*\) of a model of "
                                             rf"other sizes: its DSA layers are \[0, 2\], here {want}"):
            check_paths(_validate("recipe=keye_tiny_dsa_sparse", new, f"train.checkpoint.init_from={warm}",
                                  f"model.lm.attention_per_layer={layers}")[0])
    check_paths(_validate("recipe=keye_tiny_ksa", new, f"train.checkpoint.init_from={ksa}")[0])
    with pytest.raises(ValueError, match=r"model\.lm\.ksa\.num_summary is 1 there, 2 here"):
        check_paths(_validate("recipe=keye_tiny_ksa", new, f"train.checkpoint.init_from={ksa}",
                              "model.lm.ksa.num_summary=2")[0])
    with pytest.raises(ValueError, match=r"its KSA layers are \[0, 1, 2, 3\], here \[0, 2\]"):
        check_paths(_validate("recipe=keye_tiny_ksa", new, f"train.checkpoint.init_from={ksa}",
                              "model.lm.attention_per_layer=[ksa,dense,ksa,dense]")[0])


def test_a_distillation_from_an_import_of_a_ksa_run_s_export_reads_its_record(tmp_path):
    """`convert import` of an export wrote a checkpoint that records no run: a distillation from the import of a
    stage-2 export (refused from the export itself) took it as a stage-1 run's. The import now keeps the export's
    record of how its run trained; one without (another program's directory) is taken with a warning."""
    import warnings

    from train.launch import check_paths

    lm = _validate("recipe=keye_tiny_ksa_distill")[0].model.lm

    def imported(name, trained):
        step = tmp_path / name / "checkpoints" / "step_000000"
        step.mkdir(parents=True)
        (step / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                        "common_backend": "torch", "common_backend_version": 1}))
        common = {"step": 0, "recipe": "hf_import", "model_lm": dataclasses.asdict(lm),
                  **({"trained": trained} if trained else {})}
        torch.save({"common": common}, step / "common.pt")
        (step / "COMPLETE.json").write_text(json.dumps({"step": 0, "files": {}}))
        return tmp_path / name

    distill = ["recipe=keye_tiny_ksa_distill", f"run_dir={tmp_path / 'new'}"]
    with pytest.raises(ValueError, match=r"holds a KSA model .* whose run trained train\.trainable=all with KSA"):
        check_paths(_validate(*distill, "train.checkpoint.init_from="
                              + str(imported("stage2", {"trainable": "all", "attention": "ksa"})))[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_paths(_validate(*distill, "train.checkpoint.init_from="
                              + str(imported("stage1", {"trainable": "summary", "attention": "ksa"})))[0])
    with pytest.warns(UserWarning, match=r"holds KSA layers .* and no record of how they trained"):
        check_paths(_validate(*distill, "train.checkpoint.init_from=" + str(imported("other", None)))[0])


def test_settings_under_which_a_sparse_stage_trains_nothing_are_named(tmp_path):
    """Stages that ran with grad 0.000 every step without a word: a DSA warm-up with model.lm.dsa.loss_weight=0 (its
    whole loss is lambda x KL: a config error now), KSA windows that cover every row (no token reads a summary: the
    dense model, which a check may want, so a warning), and the sparse stage at dsa.topk=1 (a KL over one key is 0:
    a warning). The recipes' own settings pass without a word."""
    import warnings

    run = f"run_dir={tmp_path / 'new'}"
    with pytest.raises(ValueError, match=r"model\.lm\.dsa\.loss_weight=0 with train\.trainable=indexer: .* would "
                                         r"train nothing"):
        _validate("recipe=keye_tiny_dsa_warmup", run, "model.lm.dsa.loss_weight=0")
    _validate("recipe=keye_tiny_dsa_sparse", run, "model.lm.dsa.loss_weight=0")   # the model trains; the indexer not
    with pytest.warns(UserWarning, match=r"model\.lm\.ksa\.windows \[64\] \(chunks of 8 tokens\) cover every row "
                                         r"of train\.seq_length=256 \(32 chunks at most\).*at most 30 chunks"):
        _validate("recipe=keye_tiny_ksa_distill", run, "model.lm.ksa.windows=[64]")
    with pytest.warns(UserWarning, match=r"model\.lm\.dsa\.topk=1 in the sparse stage"):
        _validate("recipe=keye_tiny_dsa_sparse", run, "model.lm.dsa.topk=1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for recipe in ("keye_tiny_dsa_warmup", "keye_tiny_dsa_sparse", "keye_tiny_ksa_distill", "keye_tiny_ksa"):
            _validate(f"recipe={recipe}", run)
        _validate("recipe=keye_tiny_ksa_distill", run, "model.lm.ksa.windows=[30]")   # 32 chunks: the last reads one


def test_recipe_comments_chain_the_commands_they_give():
    """A recipe whose header comment gives the commands of a chain (the dense model, then this stage) names, in each
    init_from=runs/<dir>, the run directory an earlier command of that comment makes; without an earlier command,
    that of a recipe. keye_tiny_ksa_distill's made the multimodal keye_tiny and then read runs/keye_tiny_lm, which
    those commands never make: a user following it stopped at a config error (no such path)."""
    import re

    bad = []
    for path in sorted((REPO / "recipes" / "recipe").glob("*.yaml")):
        head = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            head.append(line[1:])
        made = []
        for command in "\n".join(head).replace("\\\n", " ").splitlines():
            if "launch/pretrain.py" not in command:
                continue
            for source in re.findall(r"init_from=(runs/\S+)", command):
                if (source not in made) if made else not (REPO / "recipes" / "recipe" / f"{source[5:]}.yaml").exists():
                    bad.append(f"{path.name}: init_from={source}, its commands make {made or 'none'}")
            run_dir, recipe = re.search(r"\brun_dir=(\S+)", command), re.search(r"recipe=(\S+)", command).group(1)
            made.append(run_dir.group(1) if run_dir else f"runs/{recipe}")
    assert not bad, bad


@pytest.mark.parametrize("overrides,world_size,warning", [
    # a replica of one rank decodes its own packs: nothing to decode once for the others
    (["recipe=keye_tiny", "parallel.vit.decode_once=true"], 2,
     "parallel.vit.decode_once=true has no effect: each data-parallel replica is one rank (parallel.tp x cp x pp = 1)"),
    (["recipe=keye_tiny_lm", "parallel.vit.decode_once=true"], 2,
     "parallel.vit.decode_once=true has no effect: this model has no vision tower (model.vision.enabled=false)"),
    (["recipe=keye_tiny", "parallel.vit.decode_once=true", "parallel.tp=2"], 2, None),
    (["recipe=keye_tiny", "parallel.vit.decode_once=true", "parallel.pp=2"], 4, None),
    (["recipe=keye_tiny"], 2, None),               # the default (null) resolves by the layout: never named
    (["recipe=keye_tiny", "parallel.vit.decode_once=false"], 2, None),
])
def test_a_decode_once_that_changes_nothing_is_named(overrides, world_size, warning):
    from train.launch import decode_once_unused

    got = decode_once_unused(*_validate(*overrides, world_size=world_size))
    assert (got is None) if warning is None else got.startswith(warning), got


def test_settings_a_resume_does_not_read_are_named_when_changed():
    """A resumed run's weights and random state come from its checkpoint: a `seed` changed since (at the layout the
    checkpoint was saved at, whose random state is restored) and a newly set train.checkpoint.init_from /
    vision_init_from change nothing, and the trainer names them in a warning (ignored_on_resume); before, the log
    listed 'seed 1234 -> 7' among the changed settings as if it applied. A stage recipe's init_from, the same at every
    launch, says nothing."""
    from train.config import ignored_on_resume

    def cfg(**kw):
        c = to_config(compose_config(["recipe=keye_tiny_lm", *[f"{k}={v}" for k, v in kw.items()]]))
        return c, dataclasses.asdict(c)

    _, saved = cfg()
    new, _ = cfg(seed=7, **{"train.checkpoint.init_from": "/runs/base"})
    assert ignored_on_resume(saved, new, rng_restored=True) == [
        f"seed {saved['seed']} -> 7 changes nothing in a resumed run: its weights were initialised and its random "
        "state comes from the checkpoint (the data's order follows data.seed)",
        "train.checkpoint.init_from='/runs/base' is not read: this run directory holds a checkpoint, which the run "
        "resumes; a run that starts from those weights takes another run_dir"]
    assert len(ignored_on_resume(saved, new, rng_restored=False)) == 1   # another layout: the seed seeds its state
    stage, stage_saved = cfg(**{"train.checkpoint.init_from": "/runs/base"})
    assert ignored_on_resume(stage_saved, stage, rng_restored=True) == []


def test_an_absolute_quarantine_path_without_rank_is_refused_where_several_replicas_would_append_to_it():
    """An absolute data.video.quarantine_path without '{rank}' was one file that the first rank of every data-parallel
    replica appended to, from every node of a multi-node run (appends of several NFS clients to one file are not
    atomic); the launch went on without a word. A relative path (one file per replica under run_dir), '{rank}', or a
    single replica is accepted."""
    with pytest.raises(ValueError, match=r"data.video.quarantine_path='/shared/q.jsonl' would be one file that "
                                         r"the first rank of each of the 2 data-parallel replicas appends to.*Put "
                                         r"'\{rank\}' in it, one file per replica "
                                         r"\(data.video.quarantine_path='/shared/q.\{rank\}.jsonl'"):
        _validate("recipe=keye_tiny", "data.video.quarantine_path=/shared/q.jsonl")
    for ok in ("data.video.quarantine_path='/shared/q.{rank}.jsonl'", "data.video.quarantine_path=q.jsonl"):
        _validate("recipe=keye_tiny", ok)
    _validate("recipe=keye_tiny", "data.video.quarantine_path=/shared/q.jsonl", "parallel.ep=1", world_size=1)


@pytest.mark.parametrize("seed", ["-1", "4294967296", "18446744073709551615"])
def test_a_seed_out_of_range_is_a_config_error(seed):
    """A top-level seed torch's generators cannot take (megatron seeds its streams at seed + 2718 + rank) stopped the
    ranks with `Overflow when unpacking long long` once the process groups existed; now the launch's check says so."""
    with pytest.raises(ValueError, match=rf"^seed must be an integer in \[0, 2\^32\), got {seed}$"):
        _validate("recipe=keye_tiny_lm", f"seed={seed}")
    _validate("recipe=keye_tiny_lm", "seed=4294967295")
