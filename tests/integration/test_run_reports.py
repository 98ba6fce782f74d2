"""What a run reports about itself, against an independent reading: wandb (offline, its run file read back here)
holds every step's values that metrics.jsonl holds, not only the steps of the console's lines; and the throughput
line's FLOPs per token are the ones counted by hand for the DSA warm-up's forward-only step."""

import json
import struct
from pathlib import Path

import pytest

from tests.launch_util import run_launch
from train.metrics import read_record

pytestmark = pytest.mark.slow


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of the offline wandb run under run_dir, read from its run-*.wandb file: a 7-byte header,
    then records framed as in a LevelDB log (32 KiB blocks; per piece a 4-byte checksum, 2-byte length, 1-byte
    kind: 1 whole, 2 first, 3 middle, 4 last), each a wandb Record protobuf."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, piece, rows = path.read_bytes()[7:], 0, b"", []
    block = 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:   # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 2):
            piece = chunk
        elif kind in (3, 4):
            piece += chunk
        if kind not in (1, 4):
            continue
        rec = pb.Record()
        rec.ParseFromString(piece)
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_gets_every_step_of_metrics_jsonl_and_the_warmup_counts_its_forward(tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    # the DSA warm-up's step (train.trainable=indexer, indexer_backward=local): the frozen model runs forward only
    # (its ranks forked: tests/launch_util.run_launch; wandb starts in each rank's launch as under torchrun)
    run_launch(2, ["recipe=keye_tiny_dsa_warmup", "train.steps=5", "train.log_interval=3",
                   "train.wandb.enabled=true", "train.wandb.mode=offline"], run,
               env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    records = [read_record(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    rows = {row["_step"]: row for row in wandb_history(run)}
    # the console printed steps 1, 3 and 5; wandb must have all five, with the values of metrics.jsonl
    assert sorted(rows) == [1, 2, 3, 4, 5]
    for rec in records:
        row = rows[rec["step"]]
        for key, value in rec.items():
            if key != "step":
                assert row[key] == pytest.approx(value, rel=1e-12), (rec["step"], key)  # JSON's float round trip

    # keye_tiny_dsa at 256 tokens, forward only: hidden 128, 4 layers, 8 x 16 query / 2 x 16 KV heads, 8 experts
    # top-2 of width 64, vocab 512; the indexer (4 heads x 8) projects every token (forward and its weights'
    # gradients) and scores every causal pair forward, and its KL's backward covers every causal pair (the
    # warm-up's attention is dense): 2 x forward
    h, layers, q, kv, seq, world = 128, 4, 8 * 16, 2 * 16, 256, 2
    matmuls = layers * (h * (q + 2 * kv) + q * h + h * 8 + 2 * 3 * h * 64) + 512 * h
    indexer = layers * h * (4 * 8 + 8 + 4)
    pairs = seq * (seq + 1) // 2
    want = 2 * matmuls + 2 * 2 * indexer + 4 * q * layers * pairs / seq + 2 * 4 * 8 * layers * 3 * pairs / seq
    for rec in records:
        got = rec["tflops_per_device"] * 1e12 * world / rec["tokens_per_s"]
        assert got == pytest.approx(want, rel=1e-9), rec["step"]   # the log's floats divided back
