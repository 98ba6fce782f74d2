"""data.video.tokenizer=<a Hugging Face tokenizer directory>: the documents a model started from Qwen3 / Keye-VL
weights needs. References: transformers' own fast tokenizer on the same file (the ids), and the byte tokenizer's
documents (the layout: the same text, frames and supervision, spelled with other ids)."""
import dataclasses
import json

import pytest
import torch

from data.video.config import VideoDataConfig
from data.video.loader import VideoPackedLoader
from data.video.packing import build_document, plan_document
from data.video.shards import load_catalog
from data.video.synthetic import make_synthetic_hf_tokenizer
from data.video.tokenizer import QWEN_VL_SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

from .conftest import small_cfg

TEXTS = ["Caption: A synthetic clip of 42 frames (3.5 s, 96x64) with a frame counter at the top.\n",
         "<12.5s>", "Q: How many frames does the clip have?\nA: ", "猫 — ünïcode, never seen in training"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_synthetic_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"))


def test_ids_equal_transformers(tok_dir):
    from transformers import PreTrainedTokenizerFast

    ours, ref = HFTokenizer(tok_dir), PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    assert isinstance(ours, Tokenizer) and ours.bos_id is None and ours.vocab_size == len(ref)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text
    for name, token in QWEN_VL_SPECIAL_TOKENS.items():
        assert getattr(ours, f"{name}_id") == ref.convert_tokens_to_ids(token), name
    assert ours.pad_id == ours.eos_id  # Qwen pads with <|endoftext|>


def test_documents_have_the_byte_layout(shard_dir, tok_dir):
    """Every synthetic sample's document, built with each tokenizer: the same frames and positions of visual
    tokens relative to the text, the same text, the same supervised text; only the ids differ, and the HF
    document has no <bos>."""
    hf, by = HFTokenizer(tok_dir), ByteTokenizer()
    # room for every sample's whole text in bytes (no cut), and the frame budget binds neither plan
    cfg = small_cfg(shard_dir, seq_len=4096, max_text_tokens=2048)
    rename = {f"<|{n}|>": f"<{n}>" for n in ("vision_start", "vision_end", "video_pad")}
    rename["<|endoftext|>"] = "<eos>"
    catalog = load_catalog(str(shard_dir))
    assert len(catalog) >= 8
    for uid, r in enumerate(catalog):
        docs = {}
        for name, tok in (("hf", hf), ("bytes", by)):
            plan = plan_document(uid=uid, key=r.key, video=r.video, annotation=r.annotation, cfg=cfg, tokenizer=tok,
                                 seed=0, epoch=0)
            docs[name] = (plan, build_document(plan, None, cfg, tok))
        (p_hf, d_hf), (p_by, d_by) = docs["hf"], docs["bytes"]
        assert p_hf.frames.timestamps == p_by.frames.timestamps and p_hf.frames.visual_tokens > 0
        assert d_hf.tokens[-1] == hf.eos_id and d_hf.tokens[0] != hf.eos_id
        text_hf = hf.decode(d_hf.tokens.tolist())
        for a, b in rename.items():
            text_hf = text_hf.replace(a, b)
        assert "<bos>" + text_hf == by.decode(d_by.tokens.tolist()), r.key
        sup_hf = d_hf.labels[d_hf.loss_mask > 0]
        sup_by = d_by.labels[d_by.loss_mask > 0]
        assert hf.decode(sup_hf.tolist()).replace("<|endoftext|>", "<eos>") == by.decode(sup_by.tolist())
        assert (d_hf.tokens == hf.video_pad_id).sum() == (d_by.tokens == by.video_pad_id).sum()


def test_loader_packs_with_hf_ids(shard_dir, tok_dir, tmp_path):
    hf = HFTokenizer(tok_dir)
    loader = VideoPackedLoader(small_cfg(shard_dir, tmp_path, tokenizer=str(tok_dir)), seed=3)
    assert isinstance(loader.tokenizer, HFTokenizer)
    n = 0
    for pack in loader:
        assert int(pack.tokens.max()) < hf.vocab_size and int(pack.tokens.min()) >= 0
        vis = int((pack.tokens == hf.video_pad_id).sum())
        assert vis * 4 == pack.pixel_values.shape[0]  # merged 2x2: 4 patches per visual token
        assert int((pack.tokens == hf.vision_start_id).sum()) == int((pack.tokens == hf.vision_end_id).sum()) > 0
        sup = pack.labels[pack.loss_mask > 0]
        assert "Caption:" not in hf.decode(sup.tolist()) and "frames" in hf.decode(sup.tolist())
        n += 1
        if n == 3:
            break
    assert n == 3


def test_bad_tokenizers_are_named(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="no such directory") as e:
        VideoDataConfig(tokenizer=str(tmp_path / "nope"))
    assert "nope" in str(e.value)
    with pytest.raises(ValueError, match="holds no tokenizer.json"):
        VideoDataConfig(tokenizer=str(tmp_path))
    # a tokenizer without Qwen-VL's vision tokens
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|video_pad|>"]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"no '<\|video_pad\|>' token"):
        build_tokenizer(VideoDataConfig(tokenizer=str(tmp_path / "plain")))
    # more ids than the embedding rows the data config promises
    with pytest.raises(ValueError, match=r"has 40\d ids, more than data.video.vocab_size = 300"):
        build_tokenizer(VideoDataConfig(tokenizer=str(tok_dir), vocab_size=300))


def test_launch_refuses_bytes_with_a_hugging_face_start(tok_dir, tmp_path):
    """A run whose LM starts from a Hugging Face checkpoint that has a tokenizer must not feed it byte ids."""
    from train.launch import compose_config, validate

    hf = tmp_path / "qwen"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    base = ["recipe=keye_tiny", "parallel=single", f"train.checkpoint.init_from={hf}"]
    with pytest.raises(ValueError, match="data.video.tokenizer=bytes") as e:
        validate(compose_config(base))
    assert f"data.video.tokenizer={hf}" in str(e.value)
    cfg, _ = validate(compose_config(base + [f"data.video.tokenizer={hf}"]))
    assert cfg.data.video.tokenizer == str(hf)
    validate(compose_config(["recipe=keye_tiny", "parallel=single"]))  # no HF start: bytes stay fine


def _without_token(tok_dir, out, token: str) -> None:
    """A copy of the tokenizer at tok_dir in `out`, without the added token `token`."""
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != token]
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(spec))


def test_qwen_chat_template_equals_transformers_rendering(tok_dir, tmp_path):
    """chat_template=qwen writes a conversation as transformers renders it with Qwen's turn layout (the template is
    written out here: <|im_start|>role, newline, content, <|im_end|>, newline), the same ids; only the answers and
    their <|im_end|> are supervised."""
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    messages = [{"role": "system", "content": "Answer with a number."},
                {"role": "user", "content": "How many frames does the clip have?"},
                {"role": "assistant", "content": "42"},
                {"role": "user", "content": "And seconds?"},
                {"role": "assistant", "content": "3.5"}]
    layout = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    want = ref.apply_chat_template(messages, chat_template=layout, tokenize=True, return_dict=False)
    cfg = VideoDataConfig(seq_len=512, tokenizer=str(tok_dir), chat_template="qwen")
    tok = build_tokenizer(cfg)
    doc = plan_document(uid=0, key="s/t", video=None, annotation={"messages": messages}, cfg=cfg, tokenizer=tok,
                        seed=0, epoch=0)
    assert doc.text_ids == list(want)
    assert tok.decode([i for i, s in zip(doc.text_ids, doc.text_loss) if s]) == "42<|im_end|>3.5<|im_end|>"
    # a tokenizer without Qwen's chat tokens cannot write this template
    _without_token(tok_dir, tmp_path / "no_chat", "<|im_start|>")
    with pytest.raises(ValueError, match=r"chat_template=qwen writes .* has no '<\|im_start\|>'"):
        build_tokenizer(VideoDataConfig(tokenizer=str(tmp_path / "no_chat"), chat_template="qwen"))
    with pytest.raises(ValueError, match="chat_template"):
        VideoDataConfig(chat_template="llama")


def test_qwen3_thinking_blocks_are_single_tokens_and_trained(tok_dir, tmp_path):
    """chat_template=qwen3 with a tokenizer that holds <think> / </think> (Qwen3's does): the blocks are one id
    each, the text decodes to Qwen3's layout (test_conversations.py checks the layout itself), and the thinking
    trains with the answer; a tokenizer without them stops the launch."""
    cfg = VideoDataConfig(seq_len=512, tokenizer=str(tok_dir), chat_template="qwen3")
    tok = build_tokenizer(cfg)
    messages = [{"role": "user", "content": "How many frames?"},
                {"role": "assistant", "content": "42", "reasoning_content": "Two per second."}]
    doc = plan_document(uid=0, key="s/t", video=None, annotation={"messages": messages}, cfg=cfg, tokenizer=tok,
                        seed=0, epoch=0)
    think = [tok._tok.token_to_id(t) for t in ("<think>", "</think>")]
    assert None not in think and all(doc.text_ids.count(i) == 1 for i in think)
    assert tok.decode(doc.text_ids) == ("<|im_start|>user\nHow many frames?<|im_end|>\n<|im_start|>assistant\n"
                                        "<think>\nTwo per second.\n</think>\n\n42<|im_end|>\n")
    assert tok.decode([i for i, s in zip(doc.text_ids, doc.text_loss) if s]) == (
        "<think>\nTwo per second.\n</think>\n\n42<|im_end|>")
    _without_token(tok_dir, tmp_path / "no_think", "</think>")
    with pytest.raises(ValueError, match=r"chat_template=qwen3 writes .* has no '</think>': give a Qwen3 tokenizer"):
        build_tokenizer(VideoDataConfig(tokenizer=str(tmp_path / "no_think"), chat_template="qwen3"))
    build_tokenizer(VideoDataConfig(tokenizer=str(tmp_path / "no_think"), chat_template="qwen"))


# Qwen3's chat template's rules for tools, thinking and tool results (its tokenizer_config.json), written out here
# as a Jinja template for transformers to render: the reference for chat_template=qwen3 with tool use
QWEN3_TOOL_RULES = """
{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
{%- if ns.multi_step_tool and message.role == 'user' and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}
{%- for message in messages %}{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}{%- set reasoning = '' %}
{%- if message.reasoning_content is string %}{%- set reasoning = message.reasoning_content %}
{%- elif '</think>' in content %}{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}
{%- for tool_call in message.tool_calls or [] %}{%- if (loop.first and content) or not loop.first %}{{- '\\n' }}{%- endif %}
{%- set call = tool_call.function if tool_call.function else tool_call %}{{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
{%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}{{- '}\\n</tool_call>' }}{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}{%- endfor %}"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city, in °C",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize("case", ["tools", "no_system", "no_tools"])
def test_qwen3_tool_use_equals_transformers_rendering(tok_dir, case):
    """chat_template=qwen3 on an agentic conversation (tools, a thinking turn of two calls, their results, an
    answer, then a second query answered after one more call) gives the ids transformers gives rendering Qwen3's
    rules above, and only the assistant turns (their thinking, calls and <|im_end|>) are supervised."""
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": None, "reasoning_content": "Two cities: two calls.",
                 "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                                {"type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Rome"}'}}]},
                {"role": "tool", "content": "18"}, {"role": "tool", "content": "24"},
                {"role": "assistant", "content": "<think>\nBoth known.\n</think>\n\nParis 18 °C, Rome 24 °C."},
                {"role": "user", "content": "And Oslo?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"name": "get_weather", "arguments": {"city": "Oslo"}}]},
                {"role": "tool", "content": "3"},
                {"role": "assistant", "content": "3 °C."}]
    tools = [WEATHER]
    if case == "no_system":
        messages = messages[1:]
    if case == "no_tools":
        tools = None
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    want = ref.apply_chat_template([{k: v for k, v in m.items() if v is not None} for m in messages], tools=tools,
                                   chat_template=QWEN3_TOOL_RULES, tokenize=True, return_dict=False)
    cfg = VideoDataConfig(seq_len=2048, tokenizer=str(tok_dir), chat_template="qwen3")
    tok = build_tokenizer(cfg)
    annotation = {"messages": messages, **({"tools": tools} if tools else {})}
    doc = plan_document(uid=0, key="s/t", video=None, annotation=annotation, cfg=cfg, tokenizer=tok, seed=0, epoch=0)
    assert doc.text_ids == list(want), (tok.decode(doc.text_ids), ref.decode(want))
    trained = tok.decode([i for i, s in zip(doc.text_ids, doc.text_loss) if s])
    assert trained.startswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n')
    assert trained.endswith("<think>\n\n</think>\n\n3 °C.<|im_end|>") and "<tool_response>" not in trained
    assert "Be brief." not in trained and "Two cities" not in trained  # that thinking precedes the last query


# Qwen3's chat template's rules without tools (its tokenizer_config.json), with transformers' {% generation %} marks
# around what an assistant turn writes after "<|im_start|>assistant\n" up to its <|im_end|>: the reference for both
# the ids and the supervised tokens (transformers' assistant mask)
QWEN3_RULES_MARKED = """
{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(found=false, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
{%- if not ns.found and message.role == 'user' %}{%- set ns.found = true %}{%- set ns.last_query_index = index %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}{%- set content = message.content %}{%- set reasoning = '' %}
{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
{{- '<|im_start|>assistant\\n' }}{% generation %}
{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}{{- content }}{%- endif %}{{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
{%- endif %}{%- endfor %}"""

# Qwen2's pre-tokenizer pattern (Qwen2.5's and Qwen3's tokenizer.json): a run of whitespace ending in a newline is one
# piece, so "assistant\n" followed by an answer opening with "\n\n" tokenizes as "assistant", "\n\n\n"
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def qwen_like_tok_dir(tmp_path_factory):
    """A small byte-level BPE with Qwen's pre-tokenizer (the regex split, then bytes) and special tokens, trained on
    text with runs of newlines, so that merges such as "\\n\\n" exist as in Qwen's vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["Hello there.\n\nHow are you?\n\n", "The answer is 42.\n\n Sure thing!", "assistant\nuser\nsystem\n",
              "Let me think.\n\nOK", "  indented\n\n\n  code"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(sorted(set(QWEN_VL_SPECIAL_TOKENS.values()) | {"<|im_start|>", "<|im_end|>"}))
    tok.add_tokens(["<think>", "</think>"])
    out = tmp_path_factory.mktemp("qwen_like")
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.mark.parametrize("template", ["qwen3", "qwen"])
def test_answers_opening_with_newlines_equal_transformers_ids_and_assistant_mask(qwen_like_tok_dir, template):
    """An answer that opens with newlines ("\\n\\nHello", as ShareGPT data has them) joins the "\\n" after
    "<|im_start|>assistant" in one token when the rendered template is tokenized whole, as transformers does: the
    turns tokenized one segment at a time gave "\\n", "\\n\\n" where transformers gives "\\n\\n\\n". The ids equal
    transformers' on Qwen's template, and the supervised tokens its assistant mask (a token holding answer text is
    supervised), under "qwen3" and "qwen" (whose layout is Qwen3's without thinking blocks: no turn after the last
    query but the last, which is written as a history turn by removing the block transformers writes)."""
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "\n\nHello there."},
                {"role": "user", "content": "\nHow are you?"},
                {"role": "assistant", "content": "  \n\nFine.\n\n"},
                {"role": "assistant", "content": "<think>\nThink.\n</think>\n\n\nOK"}]
    if template == "qwen":        # Qwen2.5's layout: every turn as is (no thinking block): the history rule for all
        messages = messages[:-1]
    ref = PreTrainedTokenizerFast(tokenizer_file=str(qwen_like_tok_dir / "tokenizer.json"))
    rules = (QWEN3_RULES_MARKED if template == "qwen3"
             else QWEN3_RULES_MARKED.replace("loop.index0 > ns", "false and ns"))
    want = ref.apply_chat_template(messages, chat_template=rules, tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)
    cfg = VideoDataConfig(seq_len=512, tokenizer=str(qwen_like_tok_dir), chat_template=template)
    tok = build_tokenizer(cfg)
    assert "\n\n\n" in [tok.decode([i]) for i in want["input_ids"]]   # the case: a token over the turn's opening
    doc = plan_document(uid=0, key="s/t", video=None, annotation={"messages": messages}, cfg=cfg, tokenizer=tok,
                        seed=0, epoch=0)
    assert doc.text_ids == list(want["input_ids"]), ([tok.decode([i]) for i in doc.text_ids],
                                                     [tok.decode([i]) for i in want["input_ids"]])
    assert doc.text_loss == [bool(m) for m in want["assistant_masks"]]


SPELLED = "<|im_start|>, <|im_end|>, <|endoftext|> and <|vision_start|>"


@pytest.mark.parametrize("template", ["plain", "qwen", "qwen3"])
def test_control_tokens_spelled_in_a_records_text_are_text(qwen_like_tok_dir, template):
    """Scraped text spells Qwen's control tokens: a system prompt quoting them, a question about "<|im_end|>", an
    answer that writes "<|im_end|>\n<|im_start|>user\n...<|endoftext|>". They were read as the tokens: the answer's
    "<|im_end|>" ended the turn (a supervised turn end in the middle of the answer, then a fake user turn and a
    document end inside the trained text), a caption's "<|vision_start|>" gave the vision id. Now a record's text is
    read as text, under every template: the ids equal those written by hand from transformers' tokenizer with
    split_special_tokens=True for each text and the template's own <|im_start|> / <|im_end|> ids, and the supervision
    is the answer (and its own turn end)."""
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(qwen_like_tok_dir / "tokenizer.json"), split_special_tokens=True)
    enc = lambda text: ref.encode(text, add_special_tokens=False)  # noqa: E731
    system = f"Quote Qwen's tokens as written: {SPELLED}."
    question = "What does <|im_end|> do?"
    answer = "It ends a turn: <|im_end|>\n<|im_start|>user\nI am not the user.<|endoftext|>"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question},
                {"role": "assistant", "content": answer}]
    S, E = ref.convert_tokens_to_ids("<|im_start|>"), ref.convert_tokens_to_ids("<|im_end|>")
    if template == "plain":                  # each segment alone: "User: ...", "Assistant: " then the answer
        parts = [(enc(system + "\n"), False), (enc(f"User: {question}\n"), False), (enc("Assistant: "), False),
                 (enc(answer + "\n"), True)]
    else:
        think = "<think>\n\n</think>\n\n" if template == "qwen3" else ""    # Qwen3's last turn: an empty block
        assert enc("assistant\n" + think + answer) == enc("assistant\n") + enc(think + answer)   # no token over both
        parts = [([S], False), (enc(f"system\n{system}"), False), ([E], False), (enc("\n"), False),
                 ([S], False), (enc(f"user\n{question}"), False), ([E], False), (enc("\n"), False),
                 ([S], False), (enc("assistant\n"), False), (enc(think + answer), True), ([E], True),
                 (enc("\n"), False)]
    cfg = VideoDataConfig(seq_len=1024, tokenizer=str(qwen_like_tok_dir), chat_template=template)
    tok = build_tokenizer(cfg)
    doc = plan_document(uid=0, key="s/t", video=None, annotation={"messages": messages}, cfg=cfg, tokenizer=tok,
                        seed=0, epoch=0)
    assert doc.text_ids == [i for ids, _ in parts for i in ids], [tok.decode([i]) for i in doc.text_ids]
    assert doc.text_loss == [s for ids, s in parts for _ in ids]
    specials = {tok.token_id(t) for t in tok.special_tokens}
    assert len(specials) == 7 and tok.eos_id in specials and tok.vision_start_id in specials
    assert [i for i in doc.text_ids if i in specials] == ([] if template == "plain" else [S, E] * 3)
    # a caption that spells the vision tokens: the document's vision ids are its frames' own
    from .test_sampling import meta

    vcfg = VideoDataConfig(seq_len=1024, tokenizer=str(qwen_like_tok_dir), chat_template=template, min_frames=2,
                           min_frame_tokens=4, max_frame_tokens=16, min_video_tokens=16, video_tokens_per_second=24.0)
    d = plan_document(uid=0, key="s/v", video=meta(2.0, fps=12.0, width=96, height=64, tb=12288),
                      annotation={"caption": f"Frames open with {SPELLED}."}, cfg=vcfg, tokenizer=tok, seed=0, epoch=0)
    a = build_document(d, None, vcfg, tok)
    assert int((torch.as_tensor(a.tokens) == tok.vision_start_id).sum()) == d.frames.num_frames
    assert int((torch.as_tensor(a.tokens) == tok.eos_id).sum()) == 1 and a.tokens[-1] == tok.eos_id


def test_a_pickled_tokenizer_still_reads_a_texts_special_tokens_as_text(tok_dir):
    """A DataLoader worker started by spawn, or any process the tokenizer is sent to, gets a pickled copy: the
    tokenizers library does not keep its setting to read special tokens as text through a pickle, so the copy read
    "<|im_end|>" as the token again. The copy encodes as the original, as transformers with split_special_tokens=True
    does."""
    import pickle

    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), split_special_tokens=True)
    tok = pickle.loads(pickle.dumps(HFTokenizer(tok_dir)))
    text = f"A page about Qwen: {SPELLED}, <|video_pad|>."
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False) == tok.encode_batch([text])[0]
    assert tok.token_id("<|im_end|>") == ref.convert_tokens_to_ids("<|im_end|>")


def test_chat_and_vision_tokens_added_as_plain_tokens_are_never_read_from_text(tok_dir, tmp_path):
    """SFT scripts add the chat tokens with `tokenizer.add_tokens([...])`, as added tokens that are not special, and
    transformers' split_special_tokens leaves those to be read from a text: an answer's "<|im_end|>" still ended the
    turn, a caption's "<|video_pad|>" was still a placeholder. The tokens the documents write by id are made special
    in the loaded tokenizer (the same ids): a text reads as it does with the tokenizer that marks them special
    (transformers, split_special_tokens=True), and a Qwen conversation's documents are the same ids."""
    from transformers import PreTrainedTokenizerFast

    plain = {"<|im_start|>", "<|im_end|>", "<|video_pad|>"}
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    for t in spec["added_tokens"]:
        t["special"] = t["special"] and t["content"] not in plain
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "tokenizer.json").write_text(json.dumps(spec))
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), split_special_tokens=True)
    tok = HFTokenizer(tmp_path / "plain")
    text = f"A page about Qwen: {SPELLED}, <|video_pad|>."
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert tok.vocab_size == len(ref) and all(tok.token_id(t) == ref.convert_tokens_to_ids(t) for t in plain)
    cfg = VideoDataConfig(seq_len=512, tokenizer=str(tmp_path / "plain"), chat_template="qwen")
    messages = {"messages": [{"role": "user", "content": "End a turn?"},
                             {"role": "assistant", "content": "Write <|im_end|>, then <|im_start|>user."}]}
    docs = [plan_document(uid=0, key="s/t", video=None, annotation=messages, cfg=dataclasses.replace(cfg, tokenizer=d),
                          tokenizer=build_tokenizer(dataclasses.replace(cfg, tokenizer=d)), seed=0, epoch=0)
            for d in (str(tmp_path / "plain"), str(tok_dir))]
    assert docs[0].text_ids == docs[1].text_ids and docs[0].text_loss == docs[1].text_loss
    assert docs[0].text_ids.count(tok.token_id("<|im_end|>")) == 2     # the two turns' own


def test_a_text_spelling_a_placeholder_token_trains_as_text_not_a_visual_token(tok_dir, tmp_path):
    """A text that spells "<|image_pad|>" or "<|video_pad|>" (a web page about Qwen-VL's prompts) was read by the
    Hugging Face tokenizer as that token, and the pack's visual positions are its placeholder tokens: the pack held
    one more visual position than the ViT's merged tokens (73 against 72), which stopped the training step; then such
    a sample was quarantined (`placeholder_in_text`). Now a record's text is read as text (transformers'
    split_special_tokens=True): the samples train, every pack's visual positions equal its frames' merged tokens
    (pixel rows / 4, the ViT's count), and the spelled tokens come back as their characters."""
    from data.video.ingest import IngestOptions, ingest
    from data.video.synthetic import make_synthetic_videos

    vids, ann = make_synthetic_videos(tmp_path, 2, seed=4, max_seconds=2.0)
    spelled = [{"text": "Qwen-VL writes <|vision_start|><|image_pad|><|vision_end|> for an image."},
               {"qa": [{"q": "Which token marks a video frame?", "a": "<|video_pad|>, once per merged token."}]}]
    ann.write_text(ann.read_text() + "".join(json.dumps(r) + "\n" for r in spelled + [{"text": "A plain text."}]))
    ingest(IngestOptions(videos=str(vids), annotations=str(ann), out=str(tmp_path / "shards"), progress=False,
                         workers=1))
    cfg = small_cfg(tmp_path / "shards", tmp_path, tokenizer=str(tok_dir), num_epochs=1, seq_len=2048)
    loader = VideoPackedLoader(cfg, seed=0)
    texts, decoded = 0, ""
    for pack in loader:
        assert len(pack.visual_pos) * 4 == pack.pixel_values.shape[0]
        pack.validate(cfg, loader.tokenizer)
        texts += pack.text_docs
        decoded += loader.tokenizer.decode(pack.tokens[pack.tokens < 400].tolist())   # the text ids (400: specials)
    assert texts == 3 and loader.stats["samples_ok"] == 5          # the two videos and the three texts
    assert not (tmp_path / "quarantine.jsonl").exists() or not (tmp_path / "quarantine.jsonl").read_text()
    assert "<|vision_start|><|image_pad|><|vision_end|> for an image." in decoded
    assert "<|video_pad|>, once per merged token." in decoded


@pytest.mark.parametrize("kind", ["video", "image", "text"])
@pytest.mark.parametrize("token", ["<|video_pad|>", "<|image_pad|>"])
def test_a_visual_placeholder_in_the_text_is_text(tok_dir, kind, token):
    """A Hugging Face tokenizer encoded the literal "<|video_pad|>" in a caption as the video_pad id: a visual
    token's place where no frame is (the step stopped on '66 visual embeddings for 67 visual positions'). Now it is
    that text's ids, as transformers' tokenizer with split_special_tokens=True gives them, in a video's, an image
    sample's and a text-only sample's text alike, and the pack has one visual place per merged token, counted from
    the frames' grids. A tokenizer dropped in that reads the token in a text still gets the sample rejected
    (`placeholder_in_text`, naming the token)."""
    from transformers import PreTrainedTokenizerFast

    from data.video.packing import assemble_pack
    from data.video.sampling import PlanError

    from .test_sampling import meta

    cfg = VideoDataConfig(seq_len=2048, min_frames=2, min_frame_tokens=4, max_frame_tokens=16, min_video_tokens=16,
                          video_tokens_per_second=24.0, max_text_tokens=300, vocab_size=1000)
    caption = f"a clip {token} of a red square"
    ann = {"caption": caption, "qa": [{"question": "color?", "answer": "red"}]}
    kw = {"video": meta(2.0, fps=12.0, width=96, height=64, tb=12288) if kind == "video" else None,
          "images": [{"width": 56, "height": 56}] if kind == "image" else None}
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), split_special_tokens=True)
    tok = HFTokenizer(tok_dir)
    d = plan_document(uid=0, key="s/0", annotation=ann, cfg=cfg, tokenizer=tok, seed=0, epoch=0, **kw)
    want = ref.encode(caption + "\n", add_special_tokens=False)
    assert ref.convert_tokens_to_ids(token) not in want and len(want) > 1
    assert any(d.text_ids[i:i + len(want)] == want for i in range(len(d.text_ids)))
    a = build_document(d, None, cfg, tok)
    p = assemble_pack([a], [d.key], cfg, tok, epoch=0, pack_index=0, failures=[], planned_keys=[d.key],
                      pixel_values=torch.zeros(int(a.grid.prod(-1).sum()), 3 * 14 * 14, dtype=torch.uint8))
    merged = int(a.grid.prod(-1).sum()) // cfg.merge_size ** 2
    assert p.visual_pos.numel() == merged and (merged > 0) == (kind != "text")

    class ReadsSpecials(HFTokenizer):            # a tokenizer that reads a text's special tokens (as before)
        def encode(self, text):
            self._tok.encode_special_tokens = False
            try:
                return super().encode(text)
            finally:
                self._tok.encode_special_tokens = True

        encode_offsets = None

    with pytest.raises(PlanError, match=r"its text holds '<\|" + token[2:-2] + r"\|>'") as e:
        plan_document(uid=0, key="s/0", annotation=ann, cfg=cfg, tokenizer=ReadsSpecials(tok_dir), seed=0, epoch=0,
                      **kw)
    assert e.value.reason == "placeholder_in_text"


# Keye-VL's and Qwen2.5-VL's chat templates write a video content part as "<|vision_start|><|video_pad|><|vision_end|>"
# where it stands in the user turn (their processors then widen <|video_pad|> to the video's tokens), an image part
# likewise with <|image_pad|>; written out here with Qwen3's rules above as the reference for where a video's frames
# and an image sample's images go under chat_template=qwen / qwen3
VIDEO_PART = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE_PART = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN3_VL_RULES_MARKED = QWEN3_RULES_MARKED.replace(
    "'\\n' + message.content + '<|im_end|>\\n' }}",
    "'\\n' }}{%- if message.content is string %}{{- message.content }}{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'video' %}{{- '" + VIDEO_PART + "' }}{%- elif part.type == 'image' %}{{- '" + IMAGE_PART
    + "' }}{%- elif part.type == 'text' %}{{- part.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}", 1)


def _naive_video_positions(n_before: int, ts_lens: list[int], grids: list[tuple[int, int]], times: list[float],
                           interval_s: float, n_after: int) -> list[tuple[int, int, int]]:
    """3D positions as packing.py's docstring states them, written out: text (p, p, p); frame k's merged tokens at
    t = max(p, A + round(ts_k * R)), (t, t + row, t + col), then p = t + max(rows, cols)."""
    out, p = [], 0
    R = max(n + 2 + max(g) for n, g in zip(ts_lens, grids)) / interval_s
    anchor = None
    for k, (n, (rows, cols)) in enumerate(zip(ts_lens, grids)):
        if k == 0:
            out += [(i, i, i) for i in range(n_before)]
            p = n_before
        out += [(p + i,) * 3 for i in range(n + 1)]          # the timestamp and <|vision_start|>
        p += n + 1
        if anchor is None:
            anchor = p - round(times[0] * R)
        t = max(p, anchor + round(times[k] * R))
        out += [(t, t + r, t + c) for r in range(rows) for c in range(cols)]
        p = t + max(rows, cols)
        out.append((p, p, p))                                  # <|vision_end|>
        p += 1
    return out + [(p + i,) * 3 for i in range(n_after)]


@pytest.mark.parametrize("form", ["part", "llava", "no_marker"])
@pytest.mark.parametrize("template", ["qwen", "qwen3"])
def test_a_videos_frames_stand_in_the_user_turn_as_keye_and_qwen_vl_write_them(tok_dir, template, form):
    """Under chat_template qwen / qwen3 a video's frames stand where Keye-VL's and Qwen2.5-VL's chat templates put the
    video: at its content part ("part"), at the "<image>" marker LLaVA-Video's conversations hold ("llava": the
    marker replaced, its line break kept, as ms-swift and LLaMA-Factory replace it), or without a marker at the start
    of the first user turn, as those templates write a video part that opens the content. They stood before the whole
    conversation ("<0.0s><|vision_start|>...<|im_start|>system"), a layout the model never sees at inference. The
    reference is transformers rendering the conversation with the video part, its 3 placeholder ids replaced by the
    frames' span (each frame's timestamp, <|vision_start|>, its merged tokens, <|vision_end|>; slow and fast frames);
    the supervised tokens are its assistant mask and <eos>, the 3D positions those the packing rules give."""
    from transformers import PreTrainedTokenizerFast

    from data.video.sampling import timestamp_text
    from data.video.timeline import encode_runs

    from .test_sampling import meta

    question = "What does the square do?"
    video_first = [{"type": "video"}, {"type": "text", "text": ("\n" if form == "llava" else "") + question}]
    parts = {"part": [{"type": "text", "text": "Watch: "}, {"type": "video"}, {"type": "text", "text": " " + question}],
             "llava": video_first, "no_marker": video_first}[form]
    ref_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts},
                {"role": "assistant", "content": "It moves right."}, {"role": "user", "content": "And the disc?"},
                {"role": "assistant", "content": "<think>\nIt waves.\n</think>\n\nIt follows a wave."}]
    if form == "part":
        annotation = {"messages": ref_msgs}
    else:
        first = ("<image>\n" if form == "llava" else "") + question
        annotation = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": first},
                                        {"from": "gpt", "value": "It moves right."},
                                        {"from": "human", "value": "And the disc?"},
                                        {"from": "gpt", "value": ref_msgs[-1]["content"]}]}
    rules = QWEN3_VL_RULES_MARKED if template == "qwen3" else QWEN3_VL_RULES_MARKED.replace("loop.index0 > ns",
                                                                                            "false and ns")
    if template == "qwen":        # Qwen2.5's layout writes the answer as it is, its <think> text included
        rules = rules.replace("{%- if '</think>' in content %}", "{%- if false %}")
    assert QWEN3_VL_RULES_MARKED != QWEN3_RULES_MARKED and "if false %}" in rules or template == "qwen3"
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    want = ref.apply_chat_template(ref_msgs, chat_template=rules, tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)
    ids, mask = list(want["input_ids"]), [bool(m) for m in want["assistant_masks"]]
    tok = HFTokenizer(tok_dir)
    part = [tok.vision_start_id, tok.video_pad_id, tok.vision_end_id]
    j = next(i for i in range(len(ids)) if ids[i:i + 3] == part)
    assert ref.decode(ids[:j]).endswith("<|im_start|>user\n" + ("Watch: " if form == "part" else ""))

    video = meta(2.0, fps=12.0, width=96, height=64, tb=12288)
    video["scene_changes"] = {"runs": encode_runs([0, 12])}      # frames after a scene change are slow, others fast
    cfg = VideoDataConfig(seq_len=2048, tokenizer=str(tok_dir), chat_template=template, min_frames=2, max_frames=8,
                          min_frame_tokens=4, max_frame_tokens=16, min_video_tokens=16, video_tokens_per_second=24.0,
                          max_text_tokens=300, fast_frame_ratio=0.3)
    plan = plan_document(uid=0, key="s/0", video=video, annotation=annotation, cfg=cfg, tokenizer=tok, seed=0, epoch=0)
    fp = plan.frames
    assert fp.num_fast and fp.num_fast < fp.num_frames           # both kinds of frames in the span
    grids = [fp.grid(cfg.patch_size, cfg.merge_size, k) for k in range(fp.num_frames)]
    ts = [tok.encode(timestamp_text(t, fp.is_fast(k))) for k, t in enumerate(fp.timestamps)]
    span = [i for k, (r, c) in enumerate(grids) for i in ts[k] + [tok.vision_start_id] + [tok.video_pad_id] * (r * c)
            + [tok.vision_end_id]]
    want_tokens = ids[:j] + span + ids[j + 3:] + [tok.eos_id]
    want_sup = mask[:j] + [False] * len(span) + mask[j + 3:] + [True]
    doc = build_document(plan, None, cfg, tok)
    assert doc.tokens.tolist() == want_tokens, (tok.decode(doc.tokens.tolist()), tok.decode(want_tokens))
    want_labels = [t if s else cfg.label_ignore_index for t, s in zip(want_tokens[1:], want_sup[1:])] + [-100]
    assert doc.labels.tolist() == want_labels
    assert doc.loss_mask.tolist() == [float(s) for s in want_sup[1:]] + [0.0]
    pos = _naive_video_positions(j, [len(t) for t in ts], grids, list(fp.timestamps), fp.interval_s,
                                 len(ids) - j - 3 + 1)
    assert [tuple(x) for x in doc.pos.T.tolist()] == pos
    assert plan.length == len(want_tokens)


def _continues_as_saved_now(cfg, now: dict, saved_before: dict) -> None:
    """A state saved before a plan field existed (`saved_before`) resumes exactly as the same state saved now (`now`):
    the next pack's keys and tokens equal, and the resumed loader's fingerprint is this code's."""
    packs = []
    for state in (now, saved_before):
        resumed = VideoPackedLoader(cfg, seed=0)
        resumed.load_state_dict(state)
        packs.append(next(resumed))
        assert resumed.state_dict()["plan_fingerprint"] == now["plan_fingerprint"]
        resumed.close()
    assert packs[0].sample_keys == packs[1].sample_keys and torch.equal(packs[0].tokens, packs[1].tokens)


def _state_as_saved_before(loader, field: str = "vision_at") -> dict:
    """The loader's state as a loader from before `field` was a planning field wrote it (before a video's frames stood
    at its marker; before a text's special tokens were read as text): the planning fields without it, and their
    fingerprint."""
    before = {k: v for k, v in loader.state_dict()["plan_config"].items() if k != field}
    loader._plan_config = lambda: dict(before)
    try:
        return loader.state_dict()
    finally:
        del loader._plan_config


def test_a_state_saved_with_frames_before_the_conversation_is_refused_or_continued_exactly(shard_dir, tok_dir,
                                                                                           tmp_path):
    """Under chat_template qwen / qwen3 a video whose text has a marker or a user turn, and an image sample without
    markers that has a user turn, have other document lengths since their frames and images stand in the user turn,
    so their packs differ from those a state saved before names: resuming such a run mid-epoch was taken as the same
    plan (and went on with packs that are not the saved epoch's). The plan fingerprint now holds where they stand
    (`vision_at`): such a state is refused, naming what changed and how to go on. Where no document changed
    (captions and QA pairs, the synthetic shards) the state saved before continues exactly: the next pack's keys and
    tokens equal those after the same state saved now."""
    import dataclasses

    from data.video.shards import load_catalog

    cfg = small_cfg(shard_dir, tmp_path, tokenizer=str(tok_dir), chat_template="qwen", decode_isolation="inline")
    catalog = list(load_catalog(str(shard_dir)))
    k = next(i for i, r in enumerate(catalog) if r.kind == "video")
    for kind, value in (("video", "<image>\nWhat does the square do?"), ("image", "What is shown?")):
        records = list(catalog)
        records[k] = dataclasses.replace(records[k], annotation={"conversations": [
            {"from": "human", "value": value}, {"from": "gpt", "value": "A square."}]})
        if kind == "image":       # an image sample without markers: its image moved into the user turn
            records[k] = dataclasses.replace(records[k], video=None, video_ext="", images=[{"width": 56, "height": 56}])
        loader = VideoPackedLoader(cfg, seed=0, catalog=records)
        assert loader.catalog.count("image") == (kind == "image")
        now, saved_before = loader.state_dict(), _state_as_saved_before(loader)
        with pytest.raises(ValueError, match=r"changed fields \(saved, now\): \{'vision_at': \(None, 'marker'\)\}"
                           ) as e:
            loader.load_state_dict(saved_before)
        assert "a video's frames now stand where its marker is" in str(e.value)
        assert "load_state_dict(state, strict=False) restarts" in str(e.value)   # a run's message: the test below
        loader.load_state_dict(now)
        assert now["plan_config"]["vision_at"] == "marker"

    first = VideoPackedLoader(cfg, seed=0)                # captions and QA pairs only: no document moved
    next(first)
    now, saved_before = first.state_dict(), _state_as_saved_before(first)
    first.close()
    assert saved_before["plan_fingerprint"] != now["plan_fingerprint"]
    _continues_as_saved_now(cfg, now, saved_before)
    plain = VideoPackedLoader(small_cfg(shard_dir, tmp_path, tokenizer=str(tok_dir)), seed=0)
    assert "vision_at" not in plain.state_dict()["plan_config"]    # "plain": its layout and state unchanged


def test_a_state_saved_when_a_text_gave_special_ids_continues_where_no_text_spells_one(shard_dir, tok_dir, tmp_path):
    """A record's text that spells a special token ("<|im_end|>") is read as its characters now, where it gave the
    token's id before: such a document has another length, so a state saved before (its planning fields without
    `specials_in_text`) is refused, naming the change and the first such sample. Where no text spells one (the
    synthetic shards) the state continues exactly: the next pack's keys and tokens equal those after the same state
    saved now."""
    import dataclasses

    from data.video.shards import load_catalog

    cfg = small_cfg(shard_dir, tmp_path, tokenizer=str(tok_dir), decode_isolation="inline")
    first = VideoPackedLoader(cfg, seed=0)
    next(first)
    now, saved_before = first.state_dict(), _state_as_saved_before(first, "specials_in_text")
    first.close()
    assert now["plan_config"]["specials_in_text"] == "text"
    assert saved_before["plan_fingerprint"] != now["plan_fingerprint"]
    _continues_as_saved_now(cfg, now, saved_before)

    records = list(load_catalog(str(shard_dir)))
    k = next(i for i, r in enumerate(records) if r.kind == "video")
    records[k] = dataclasses.replace(records[k], annotation={"caption": "Qwen ends a turn with <|im_end|>."})
    loader = VideoPackedLoader(cfg, seed=0, catalog=records)
    with pytest.raises(ValueError, match=r"changed fields \(saved, now\): \{'specials_in_text': \(None, 'text'\)\}"
                       ) as e:
        loader.load_state_dict(_state_as_saved_before(loader, "specials_in_text"))
    assert "is now read as its characters" in str(e.value)
    assert f"the first {records[k].shard.rsplit('/', 1)[-1]}/{records[k].key}" in str(e.value)
    from train.config import SettingsError
    from train.data_streams import restore_data_state

    with pytest.raises(SettingsError, match=r"the packs cannot be continued exactly\); to go on from its weights "
                                            r"instead, start another run directory"):   # no setting brings it back
        restore_data_state([loader], _state_as_saved_before(loader, "specials_in_text"), run_dir="runs/ft",
                           checkpoint="runs/ft/checkpoints/step_000010")
    assert "specials_in_text" not in VideoPackedLoader(small_cfg(shard_dir, tmp_path), seed=0).state_dict()[
        "plan_config"]    # the byte tokenizer's text never gave a special id: its state is unchanged


def test_a_resumed_run_whose_data_state_does_not_fit_is_told_what_it_can_do(shard_dir, tok_dir, tmp_path):
    """A run resumed after a data.video setting changed (here max_text_tokens) stopped with the loader's ValueError, a
    traceback ending "; pass strict=False to restart at the saved epoch's beginning", which no setting of a run
    passes. The trainer's restore (train/data_streams.restore_data_state) makes it a config error (SettingsError:
    exit 2, no traceback) naming the checkpoint and what changed, and what the user can do: launch with the
    settings the state was saved with, or start another run directory from the run's weights (init_from naming
    it). Where only the frames' place moved (chat_template qwen, a state from before), nothing can be set back:
    the second way alone. The loader's own message names strict=False for its callers, which still restarts."""
    import dataclasses

    from train.config import SettingsError
    from train.data_streams import restore_data_state

    cfg = small_cfg(shard_dir, tmp_path)
    saved = VideoPackedLoader(cfg, seed=0)
    next(saved)
    state = saved.state_dict()
    saved.close()
    loader = VideoPackedLoader(dataclasses.replace(cfg, max_text_tokens=200), seed=0)
    where = dict(checkpoint="runs/ft/checkpoints/step_000010", run_dir="runs/ft")
    with pytest.raises(SettingsError) as e:
        restore_data_state([loader], state, **where)
    msg = str(e.value)
    assert msg.startswith("the data state of runs/ft/checkpoints/step_000010 cannot be continued: loader state does "
                          "not match this data/config: ") and "strict=False" not in msg, msg
    assert ("changed fields (saved, now): {'max_text_tokens': (256, 200)}; to continue it exactly, launch it with "
            "the data and data.video settings it was saved with; to go on from its weights instead, start another "
            "run directory from them: run_dir=<a new directory> train.checkpoint.init_from=runs/ft (its data from the "
            "beginning, a fresh optimizer)") in msg, msg
    with pytest.raises(ValueError, match=r"; load_state_dict\(state, strict=False\) restarts at the saved epoch's "
                                         r"beginning$"):
        loader.load_state_dict(state)
    with pytest.warns(UserWarning, match="restarting at the beginning of the saved epoch"):
        loader.load_state_dict(state, strict=False)
    loader.close()

    catalog = list(load_catalog(str(shard_dir)))
    k = next(i for i, r in enumerate(catalog) if r.kind == "video")
    catalog[k] = dataclasses.replace(catalog[k], annotation={"conversations": [
        {"from": "human", "value": "<image>\nWhat does the square do?"}, {"from": "gpt", "value": "A square."}]})
    moved = VideoPackedLoader(small_cfg(shard_dir, tmp_path, tokenizer=str(tok_dir), chat_template="qwen",
                                        decode_isolation="inline"), seed=0, catalog=catalog)
    with pytest.raises(SettingsError, match=r"the packs cannot be continued exactly\); to go on from its weights "
                                            r"instead, start another run directory"):
        restore_data_state([moved], _state_as_saved_before(moved), **where)


@pytest.mark.parametrize("template", ["qwen", "qwen3"])
def test_images_without_markers_open_the_first_user_turn(tok_dir, template):
    """An image sample whose conversation has no "<image>" marker: under chat_template qwen / qwen3 its images stand at
    the start of the first user turn, as Qwen2-VL's and Keye-VL's templates write image parts that open the content
    (ms-swift adds the markers so); they stood before the whole conversation ("<|vision_start|><|image_pad|>...
    <|vision_end|><|im_start|>system"). Reference: transformers rendering the conversation with two image parts
    before the question, each part's 3 placeholder ids replaced by the image's merged tokens; the supervised tokens
    its assistant mask and <eos>, the positions an image's (t = p, h = p + row, w = p + col, then p + max(rows,
    cols))."""
    from transformers import PreTrainedTokenizerFast

    question, answer = "Which is larger?", "<think>\nCompare.\n</think>\n\nThe first."
    ref_msgs = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": answer}]
    annotation = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": question},
                                    {"from": "gpt", "value": answer}]}
    rules = QWEN3_VL_RULES_MARKED if template == "qwen3" else QWEN3_VL_RULES_MARKED.replace(
        "loop.index0 > ns", "false and ns").replace("{%- if '</think>' in content %}", "{%- if false %}")
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    want = ref.apply_chat_template(ref_msgs, chat_template=rules, tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)
    ids, mask = list(want["input_ids"]), [bool(m) for m in want["assistant_masks"]]
    tok = HFTokenizer(tok_dir)
    cfg = VideoDataConfig(seq_len=1024, tokenizer=str(tok_dir), chat_template=template, max_image_tokens=6)
    images = [{"width": 84, "height": 56}, {"width": 56, "height": 56}]
    plan = plan_document(uid=0, key="s/0", video=None, images=images, annotation=annotation, cfg=cfg, tokenizer=tok,
                         seed=0, epoch=0)
    tokens, sup, pos, p, i = [], [], [], 0, 0
    for fp in plan.images:        # each image part of the reference, in order, becomes its merged tokens
        j = next(q for q in range(i, len(ids)) if ids[q:q + 3] == [tok.vision_start_id, tok.image_pad_id,
                                                                     tok.vision_end_id])
        rows, cols = fp.grid(cfg.patch_size, cfg.merge_size)
        pos += [(q,) * 3 for q in range(p, p + j - i + 1)]          # the text before it and <|vision_start|>
        p += j - i + 1
        pos += [(p, p + r, p + c) for r in range(rows) for c in range(cols)]
        p += max(rows, cols)
        pos.append((p,) * 3)                                           # <|vision_end|>
        p += 1
        tokens += ids[i:j] + [tok.vision_start_id] + [tok.image_pad_id] * (rows * cols) + [tok.vision_end_id]
        sup += mask[i:j] + [False] * (rows * cols + 2)
        i = j + 3
    tokens += ids[i:] + [tok.eos_id]
    sup += mask[i:] + [True]
    pos += [(q,) * 3 for q in range(p, p + len(ids) - i + 1)]
    assert ref.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + IMAGE_PART * 2)
    doc = build_document(plan, None, cfg, tok)
    assert doc.tokens.tolist() == tokens, (tok.decode(doc.tokens.tolist()), tok.decode(tokens))
    assert doc.labels.tolist() == [t if s else -100 for t, s in zip(tokens[1:], sup[1:])] + [-100]
    assert [tuple(x) for x in doc.pos.T.tolist()] == pos
    assert plan.length == len(tokens)


# records that spell "<video>" / "<image>" where they are words: a caption about HTML's tags, an answer that writes
# them; and a LLaVA-style record whose user turn marks the video (the frames stand there under qwen / qwen3)
CAPTION = {"caption": "Embed it with the <video> tag.",
           "qa": [{"q": "Which tag?", "a": "The <image> tag, for stills."}]}
ASKED = {"conversations": [{"from": "human", "value": "<video>\nWhich HTML tag embeds a clip?"},
                           {"from": "gpt", "value": "Write <video> or, for a picture, <image>."}]}
UNMARKED = {"messages": [{"role": "system", "content": "Quote <image> as it is."},
                         {"role": "user", "content": "Which HTML tag embeds a clip?"},
                         {"role": "assistant", "content": "Use <video>."}]}


def _marker_reference(record: dict, template: str, enc, S: list[int], E: list[int]) -> tuple[list[int], list[int]]:
    """The ids before and after a video's frames, written out: "plain" tokenizes each segment alone and keeps the
    frames first (the user turn's marker dropped with its line); "qwen" / "qwen3" tokenize the text between the
    template's turn tokens (S, E) whole, the frames at the user turn's marker, else at the start of its text."""
    think = "<think>\n\n</think>\n\n" if template == "qwen3" else ""
    if template == "plain":
        return [], {
            "caption": lambda: enc("Caption: ") + enc("Embed it with the <video> tag.\n") + enc("Q: Which tag?\nA: ")
            + enc("The <image> tag, for stills.\n"),
            "asked": lambda: enc("User: Which HTML tag embeds a clip?\n") + enc("Assistant: ")
            + enc("Write <video> or, for a picture, <image>.\n"),
            "unmarked": lambda: enc("Quote <image> as it is.\n") + enc("User: Which HTML tag embeds a clip?\n")
            + enc("Assistant: ") + enc("Use <video>.\n")}[record]()
    if record == "caption":
        return [], enc("Caption: Embed it with the <video> tag.\nQ: Which tag?\nA: The <image> tag, for stills.\n")
    if record == "asked":
        answer = f"assistant\n{think}Write <video> or, for a picture, <image>."
        turns = enc("\nWhich HTML tag embeds a clip?") + E + enc("\n") + S + enc(answer) + E + enc("\n")
        return S + enc("user\n"), turns
    return (S + enc("system\nQuote <image> as it is.") + E + enc("\n") + S + enc("user\n"),
            enc("Which HTML tag embeds a clip?") + E + enc("\n") + S + enc(f"assistant\n{think}Use <video>.") + E
            + enc("\n"))


@pytest.mark.parametrize("tokenizer", ["bytes", "hf"])
@pytest.mark.parametrize("template", ["plain", "qwen", "qwen3"])
def test_markers_spelled_where_a_record_writes_words_are_text(qwen_like_tok_dir, template, tokenizer):
    """"<video>" and "<image>" mark a picture only where a record places one (a prompt, a QA question, a user turn, a
    free text); in a caption, an answer, a system turn they are words. A caption about HTML's "<video> tag" lost the
    word under "plain" ("Embed it with the  tag.") and got the frames there under "qwen" / "qwen3" (frames inside the
    supervised caption); an answer that wrote "<video>" got the frames into the answer, and one that wrote two markers
    beside the user's was refused ("1 video but 2 '<video>' and 1 '<image>' markers"). The ids before and after the
    frames equal the pieces tokenized by hand (the byte tokenizer; transformers' tokenizer with
    split_special_tokens=True), the frames at the user's marker, and the document holds one vision span per frame."""
    from transformers import PreTrainedTokenizerFast

    from .test_sampling import meta

    cfg = VideoDataConfig(seq_len=1024, chat_template=template, min_frames=2, min_frame_tokens=4,
                          max_frame_tokens=16, min_video_tokens=16, video_tokens_per_second=24.0, max_text_tokens=512,
                          **({"tokenizer": str(qwen_like_tok_dir)} if tokenizer == "hf" else {}))
    tok = build_tokenizer(cfg)
    if tokenizer == "hf":
        ref = PreTrainedTokenizerFast(tokenizer_file=str(qwen_like_tok_dir / "tokenizer.json"),
                                      split_special_tokens=True)
        enc = lambda text: ref.encode(text, add_special_tokens=False)  # noqa: E731
        S, E = [ref.convert_tokens_to_ids("<|im_start|>")], [ref.convert_tokens_to_ids("<|im_end|>")]
    else:
        enc = lambda text: list(text.encode("utf-8"))  # noqa: E731
        S, E = [tok.special_token_offset + 8], [tok.special_token_offset + 9]   # the byte tokenizer's turn tokens
    for name, record in (("caption", CAPTION), ("asked", ASKED), ("unmarked", UNMARKED)):
        d = plan_document(uid=0, key="s/v", video=meta(2.0, fps=12.0, width=96, height=64, tb=12288),
                          annotation=record, cfg=cfg, tokenizer=tok, seed=0, epoch=0)
        before, after = (d.chunks[0][0], d.chunks[-1][0]) if d.chunks else ([], d.text_ids)
        want = _marker_reference(name, template, enc, S, E)
        assert (before, after) == want, (name, tok.decode(before), tok.decode(after), tok.decode(want[1]))
        a = build_document(d, None, cfg, tok)
        assert int((torch.as_tensor(a.tokens) == tok.vision_start_id).sum()) == d.frames.num_frames > 0
        trained = tok.decode(a.labels[a.loss_mask > 0].tolist())     # the words the model learns to write
        answer = {"caption": "Embed it with the <video> tag.", "asked": "Write <video> or, for a picture, <image>.",
                  "unmarked": "Use <video>."}[name]
        assert answer in trained and "<image> tag, for stills." in trained if name == "caption" else answer in trained


def test_a_state_saved_when_every_marker_was_a_marker_continues_where_none_is_a_word(shard_dir, tmp_path):
    """A "<video>" or "<image>" in a caption, an answer or a system turn is text now, where it was a marker before
    (dropped under "plain", the frames there under "qwen"): such a document has another length, so a state saved
    before (its planning fields without `markers`) is refused, naming the change and the first such sample. Where no
    record spells one there (the synthetic shards) it continues exactly: the next pack's keys and tokens equal those
    after the same state saved now."""
    import dataclasses

    from data.video.shards import load_catalog

    cfg = small_cfg(shard_dir, tmp_path, decode_isolation="inline")
    first = VideoPackedLoader(cfg, seed=0)
    next(first)
    now, saved_before = first.state_dict(), _state_as_saved_before(first, "markers")
    first.close()
    assert now["plan_config"]["markers"] == "user" and saved_before["plan_fingerprint"] != now["plan_fingerprint"]
    _continues_as_saved_now(cfg, now, saved_before)

    records = list(load_catalog(str(shard_dir)))
    k = next(i for i, r in enumerate(records) if r.kind == "video")
    records[k] = dataclasses.replace(records[k], annotation={"caption": "Embed it with the <video> tag."})
    loader = VideoPackedLoader(cfg, seed=0, catalog=records)
    with pytest.raises(ValueError, match=r"changed fields \(saved, now\): \{'markers': \(None, 'user'\)\}") as e:
        loader.load_state_dict(_state_as_saved_before(loader, "markers"))
    assert "spelled in a caption, an event, an answer" in str(e.value)
    assert f"the first {records[k].shard.rsplit('/', 1)[-1]}/{records[k].key}" in str(e.value)


def test_a_state_saved_when_byte_turn_tokens_were_bytes_continues_where_no_record_has_a_conversation(shard_dir,
                                                                                                   tmp_path):
    """Under the byte tokenizer a chat template's <|im_start|> / <|im_end|> are one id each now, where they were their
    bytes: a conversation's document is shorter, so a state saved before (its planning fields without `turn_tokens`)
    is refused, naming the change and the first such sample; where no record has a conversation (the synthetic
    shards' captions and QA pairs) it continues exactly."""
    import dataclasses

    from data.video.shards import load_catalog

    cfg = small_cfg(shard_dir, tmp_path, chat_template="qwen", decode_isolation="inline")
    first = VideoPackedLoader(cfg, seed=0)
    next(first)
    now, saved_before = first.state_dict(), _state_as_saved_before(first, "turn_tokens")
    first.close()
    assert now["plan_config"]["turn_tokens"] == "ids" and saved_before["plan_fingerprint"] != now["plan_fingerprint"]
    _continues_as_saved_now(cfg, now, saved_before)

    records = list(load_catalog(str(shard_dir)))
    k = next(i for i, r in enumerate(records) if r.kind == "video")
    records[k] = dataclasses.replace(records[k], annotation={"conversations": [
        {"from": "human", "value": "What moves?"}, {"from": "gpt", "value": "A square."}]})
    loader = VideoPackedLoader(cfg, seed=0, catalog=records)
    with pytest.raises(ValueError, match=r"changed fields \(saved, now\): \{'turn_tokens': \(None, 'ids'\)\}") as e:
        loader.load_state_dict(_state_as_saved_before(loader, "turn_tokens"))
    assert "are now one id each" in str(e.value)
    assert f"the first {records[k].shard.rsplit('/', 1)[-1]}/{records[k].key}" in str(e.value)
    assert "turn_tokens" not in VideoPackedLoader(small_cfg(shard_dir, tmp_path), seed=0).state_dict()["plan_config"]
