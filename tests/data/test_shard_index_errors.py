"""A shard index that cannot be read as one (an interrupted copy, a hand edit, another tool's JSON) stops the catalog
with an error naming its file, the sample and what is wrong: before, a bare `JSONDecodeError: Expecting value`,
`KeyError: 'samples'` or `KeyError: 'video_offset'` named no file of thousands, and the trainer printed it as a
traceback (tests/dist/test_config_error_once.py: a `data error`, exit 2, printed once)."""
import json
import shutil

import pytest

from data.video.shards import ShardIndexError, load_catalog


def _sample(shard_dir):
    first = sorted(shard_dir.glob("*.idx.json"))[0]
    return first, json.loads(first.read_text())


@pytest.mark.parametrize("case", ["empty", "half", "object", "array", "not_object", "no_key", "no_offset",
                                  "negative_size", "image_members", "crc"])
def test_a_broken_index_is_named_with_what_is_wrong(shard_dir, tmp_path, case):
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    path, idx = _sample(shards)
    text = path.read_text()
    s0 = idx["samples"][0]
    body = {"empty": "", "half": text[: len(text) // 2], "object": "{}", "array": "[]",
            "not_object": json.dumps({"samples": [3]}),
            "no_key": json.dumps({"samples": [{k: v for k, v in s0.items() if k != "key"}]}),
            "no_offset": json.dumps({"samples": [{k: v for k, v in s0.items() if k != "video_offset"}]}),
            "negative_size": json.dumps({"samples": [dict(s0, video_size=-1)]}),
            "image_members": json.dumps({"samples": [dict(s0, image_members=[{"offset": 0}])]}),
            "crc": json.dumps({"samples": [dict(s0, video_crc32=2**32)]})}[case]
    path.write_text(body)
    what = {"empty": "not JSON (Expecting value", "half": "not JSON (", "object": "not a shard index (a JSON object",
            "array": "not a shard index (a JSON object", "not_object": "sample 0: not an object (a JSON int)",
            "no_key": "sample 0: no string 'key'",
            "no_offset": f"sample 0 ({s0['key']}): 'video_offset' not a byte count",
            "negative_size": f"sample 0 ({s0['key']}): 'video_size' not a byte count",
            "image_members": f"sample 0 ({s0['key']}): 'image_members' not a list",
            "crc": f"sample 0 ({s0['key']}): a member's CRC32 ('video_crc32', an image member's 'crc32') not an "
                   f"integer in [0, 2^32)"}[case]
    with pytest.raises(ShardIndexError) as e:
        load_catalog(str(shards), field="long_shards")
    assert str(e.value).startswith(f"VideoDataConfig.long_shards: shard index {path}: {what}"), e.value
    assert str(e.value).endswith("write it again (launch/ingest.py), or delete it: a local shard without its index "
                                 "is scanned")
    path.unlink()      # as the message says: scanned
    assert len(load_catalog(str(shards))) == len(load_catalog(str(shard_dir)))
