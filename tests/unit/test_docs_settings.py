"""The settings the docs name exist in the config schema, so the docs cannot drift from it.

Every dotted `model.` / `parallel.` / `data.` / `train.` name in README.md, docs/*.md, the module READMEs and the
recipes' comments must be a key of `train.config.Config` (the schema Hydra checks a command line against), every
`group=name` a file of recipes/, and the defaults table of docs/data.md ("Config reference") must list every field of
`VideoDataConfig` with its default.
"""

import ast
import dataclasses
import re
from pathlib import Path

from omegaconf import OmegaConf

from data.video.config import VideoDataConfig
from train.config import Config

REPO = Path(__file__).resolve().parents[2]
DOCS = ([REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
        + sorted(p for p in REPO.glob("*/**/README.md") if "bench" not in p.parts)
        + sorted((REPO / "recipes").glob("**/*.yaml")))
GROUPS = ("model", "parallel", "data", "train")
# a dotted name not preceded by a word character, '.', '/' or '-' (so `docs/data.md`, `x.train.y` are not names)
SETTING = re.compile(r"(?<![\w./-])((?:model|parallel|data|train)(?:\.[A-Za-z_][A-Za-z_0-9]*)+)")
GROUP_OPTION = re.compile(r"(?<![\w./+-])(model|parallel|data|train|recipe)=([A-Za-z_0-9{},]+)")

# dotted names the docs use that are not settings, each with the reason
NOT_SETTINGS = {
    "data.video.isolation": "a module (`python -m data.video.isolation`)",
    "data.video.synthetic": "a module (`from data.video.synthetic import ...`)",
    "data.video.tokenizer.Tokenizer": "a class of the module data/video/tokenizer.py",
    "data.video.packing.patchify": "a function of the module data/video/packing.py",
    "model.loss_chunk_tokens": "the attribute of a built GPTModel that ChunkedLossMixin reads (models/moe/README.md)",
}
# prefixes of Hugging Face tensor names (docs/hf.md's tables), not settings
HF_TENSOR_PREFIXES = ("model.layers", "model.embed_tokens", "model.norm", "model.summary_embed", "model.language_model",
                      "model.visual", "model.mlp_AR", "model.X")
FILE_SUFFIXES = (".py", ".json", ".jsonl", ".safetensors", ".md", ".yaml")  # file names such as model.safetensors


def _schema_has(schema: dict, name: str) -> bool:
    node = schema
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _doc_lines():
    for path in DOCS:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if path.suffix == ".yaml":  # a recipe: its comments only
                if "#" not in line:
                    continue
                line = line[line.index("#"):]
            yield f"{path.relative_to(REPO)}:{i}", line


def test_every_setting_named_in_the_docs_exists_in_the_schema():
    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    missing = []
    for where, line in _doc_lines():
        for m in SETTING.finditer(line):
            name = m.group(1)
            if (name in NOT_SETTINGS or name.startswith(HF_TENSOR_PREFIXES) or name.endswith(FILE_SUFFIXES)
                    or _schema_has(schema, name)):
                continue
            missing.append(f"{where}: {name}")
    assert not missing, "settings named in the docs that the config schema lacks:\n" + "\n".join(missing)


def test_every_config_group_option_named_in_the_docs_is_a_recipe_file():
    missing = []
    for where, line in _doc_lines():
        for m in GROUP_OPTION.finditer(line):
            group, name = m.groups()
            braces = re.fullmatch(r"(.*)\{(.*)\}(.*)", name)  # keye_30b_a3b_ctx_{8k,32k}: one file each
            names = [braces[1] + x + braces[3] for x in braces[2].split(",")] if braces else [name]
            missing += [f"{where}: {group}={n}" for n in names
                        if not (REPO / "recipes" / group / f"{n}.yaml").is_file()]
    assert not missing, "config group options named in the docs without a recipes/ file:\n" + "\n".join(missing)


def test_video_data_config_reference_table_matches_the_dataclass():
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(VideoDataConfig)}
    text = (REPO / "docs" / "data.md").read_text()
    table = text.split("## Config reference (`VideoDataConfig`)")[1].split("\n\n")[1].splitlines()[2:]
    wrong, listed = [], set()
    for row in table:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        names, values = re.findall(r"`(\w+)`", cells[0]), [v.strip() for v in cells[1].split(", ")]
        assert len(names) == len(values), f"docs/data.md row {row[:60]!r}: {len(names)} names, {len(values)} defaults"
        for name, value in zip(names, values):
            listed.add(name)
            if name not in defaults:
                wrong.append(f"{name}: no such field")
            elif ast.literal_eval(value) != defaults[name]:
                wrong.append(f"{name}: docs say {value}, the dataclass {defaults[name]!r}")
    wrong += [f"{name}: not in the table" for name in defaults if name not in listed]
    assert not wrong, "docs/data.md's VideoDataConfig table:\n" + "\n".join(wrong)
