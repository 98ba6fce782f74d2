"""The hour-long video data path: ingest -> shards -> sampling plan -> decode -> packing -> loader.

Public names are imported lazily so that light users (the guarded decode child process, the
ingest CLI) do not pay for importing torch.

    from data.video import VideoDataConfig, VideoPackedLoader
    loader = VideoPackedLoader(VideoDataConfig(shards="data/shards", seq_len=8192),
                               dp_rank=rank, dp_world=world, seed=1234)
    for batch in loader: ...            # PackedSample
    state = loader.state_dict(); loader.load_state_dict(state)

See docs/data.md.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "VideoDataConfig": "config",
    "Tokenizer": "tokenizer", "ByteTokenizer": "tokenizer", "build_tokenizer": "tokenizer",
    "FramePlan": "sampling", "PlanError": "sampling", "plan_frames": "sampling",
    "video_token_budget": "sampling", "snap_frame_size": "sampling", "timestamp_text": "sampling",
    "PackedSample": "packing", "pack_greedy": "packing", "plan_document": "packing",
    "build_document": "packing", "assemble_pack": "packing", "patchify": "packing",
    "VideoPackedLoader": "loader", "merge_rank_states": "loader", "epoch_order": "loader",
    "DecodeRequest": "backends", "DecodeError": "backends", "decode_frames": "backends",
    "IngestOptions": "ingest", "ingest": "ingest",
    "make_synthetic_shards": "synthetic", "make_synthetic_videos": "synthetic",
    "make_bad_videos": "synthetic", "write_video": "synthetic", "read_counter": "synthetic",
    "VideoSpec": "synthetic",
    "GuardedWorker": "isolation", "WorkerFailure": "isolation",
    "load_catalog": "shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'data.video' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)
