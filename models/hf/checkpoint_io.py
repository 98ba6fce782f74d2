"""Reading and writing Hugging Face safetensors checkpoints, lazily and in bounded pieces.

`HFCheckpoint` opens a directory holding config.json and either model.safetensors or shards listed in
model.safetensors.index.json. Nothing is read at open time but the JSON files and the safetensors
headers; `read` fetches one slice of one tensor through `safe_open(...).get_slice`, so a rank reads only
the rows (and columns) its shard of the model needs.

`HFShardWriter` writes tensors into files of bounded size (`model-0000i-of-0000n.safetensors` plus the
index, or a single `model.safetensors` when everything fits in one file), as `save_pretrained` does.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
EXPORT_RECORD = "keye_export.json"   # an export's record (launch/convert.py): the checkpoint it read, the weight files
                                     # it wrote, and how the source run trained ("trained")


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory with config.json and safetensors weights (one file or an index)."""
    p = Path(path)
    return (p / "config.json").is_file() and ((p / INDEX).is_file() or (p / SINGLE).is_file())


def export_record(hf_dir: str | os.PathLike) -> dict | None:
    """The EXPORT_RECORD of an export of ours in `hf_dir`; None where there is none (another program's checkpoint,
    or a copy of an export without it) or it cannot be read."""
    try:
        record = json.loads(Path(hf_dir, EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object file of a Hugging Face directory (config.json, the index); ValueError naming the file when it
    is no such file (a hand edit that broke it, a download cut short)."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


class HFCheckpoint:
    """A Hugging Face checkpoint directory, read lazily (one slice of one tensor at a time)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"{self.path}: no config.json (not a Hugging Face checkpoint directory)")
        self.config: dict = read_json(cfg)
        index = self.path / INDEX
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map (tensor name -> file)")
        elif (self.path / SINGLE).is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.path}: neither {INDEX} nor {SINGLE}")
        self._safe_open = safe_open
        self._handles: dict[str, object] = {}
        self.file_of: dict[str, str] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        for fname in files:
            if not (self.path / fname).is_file():
                raise FileNotFoundError(f"{self.path}: {INDEX} names {fname}, which does not exist")
            handle = self._open(fname)
            for name in handle.keys():
                if name in self.file_of:
                    raise ValueError(f"{self.path}: tensor {name} is stored twice ({self.file_of[name]}, {fname})")
                self.file_of[name] = fname
                sl = handle.get_slice(name)
                self._shape[name] = tuple(sl.get_shape())
                self._dtype[name] = sl.get_dtype()
        if weight_map is not None:
            wrong = sorted(n for n, f in weight_map.items() if self.file_of.get(n) != f)
            if wrong:
                raise ValueError(f"{self.path}: {INDEX} disagrees with the shard files about {len(wrong)} "
                                 f"tensor(s), e.g. {wrong[:5]}")

    def _open(self, fname: str):
        if fname not in self._handles:
            from safetensors import SafetensorError

            try:
                self._handles[fname] = self._safe_open(str(self.path / fname), framework="pt", device="cpu")
            except SafetensorError as e:  # a file cut short (a download or copy that stopped) or not safetensors
                raise ValueError(f"{self.path / fname} is not a readable safetensors file ({e}): copy it again") \
                    from None
        return self._handles[fname]

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype(self, name: str) -> str:
        """safetensors dtype string of a tensor, e.g. 'BF16', 'F32'."""
        return self._dtype[name]

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The tensor `name`, or only `tensor[index]` (basic slices), read from disk without the rest."""
        sl = self._open(self.file_of[name]).get_slice(name)
        return sl[:] if index is None else sl[index]


# the files a save of weights owns in its directory: config.json, the index, the weight files (ours or
# save_pretrained's, the language model's and the vision tower's) and those left by a write that was cut off
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5}|-vision(-\d{5}-of-\d{5})?)?(\.safetensors|\.safetensors\.tmp|\.tmp)$")


def remove_earlier_save(out_dir: str | os.PathLike, also: tuple[str, ...] = ()) -> list[str]:
    """Removes from `out_dir` the config.json and the weight files of an earlier save (and the files named in
    `also`), before new weights are written there; other files (a tokenizer, a README) stay. Returns their names.

    Left in place, an earlier save's files mix with the new ones: a single model.safetensors beside new shards is
    what transformers loads (it looks for that name first) while the new index names the shards, and shards the
    new save does not overwrite stay listed nowhere or under the old index. config.json goes first, and the new
    one is written last, so a directory a save left half-written holds no config.json and loads nowhere."""
    files = earlier_save_files(out_dir, also)
    for p in files:
        p.unlink()
    return [p.name for p in files]


def earlier_save_files(out_dir: str | os.PathLike, also: tuple[str, ...] = ()) -> list[Path]:
    """The files of `out_dir` that remove_earlier_save removes, config.json first: config.json, the weight files
    (model*.safetensors, model-vision*.safetensors, their .tmp), the index and the files named in `also`."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    first = [out / "config.json"] if (out / "config.json").is_file() else []
    return first + sorted(p for p in out.iterdir() if p.is_file() and (
        _WEIGHT_FILE.match(p.name) or p.name in (INDEX, INDEX + ".tmp", *also)))


class HFShardWriter:
    """Writes named tensors into safetensors files of at most `max_shard_bytes` (a tensor larger than
    that gets a file of its own), then the index. Call `add_shard` once per planned shard, in order."""

    def __init__(self, out_dir: str | os.PathLike, num_shards: int):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.num_shards = num_shards
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._written = 0

    @staticmethod
    def shard_name(i: int, num_shards: int) -> str:
        return SINGLE if num_shards == 1 else f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"

    def add_shard(self, tensors: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        fname = self.shard_name(self._written, self.num_shards)
        path = self.out / fname
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates the file owner-only
        os.replace(tmp, path)
        for k, v in tensors.items():
            self.weight_map[k] = fname
            self.total_bytes += v.numel() * v.element_size()
        self._written += 1
        return path

    def finish(self) -> None:
        if self._written != self.num_shards:
            raise RuntimeError(f"planned {self.num_shards} shard files, wrote {self._written}")
        if self.num_shards > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
            tmp = self.out / (INDEX + ".tmp")
            tmp.write_text(json.dumps(index, indent=2) + "\n")
            os.replace(tmp, self.out / INDEX)
