"""Conversation records (docs/data.md "Conversations"): ShareGPT / LLaVA-Video `conversations` and OpenAI-style
`messages`, on videos, images and text alone. References independent of the code under test: the documents
written out here by hand from each record, read back through the byte tokenizer; the burned-in numbers of the
synthetic images at the places of their markers."""
import json

import pytest

from data.video.annotations import Control, annotation_segments, conversation_turns
from data.video.ingest import IngestOptions, ingest, read_annotations
from data.video.loader import VideoPackedLoader
from data.video.synthetic import make_synthetic_videos, read_counter, write_image

from .conftest import small_cfg
from .test_loader import documents

LLAVA = {"conversations": [{"from": "human", "value": "<image>\nWhat does the square do?"},
                           {"from": "gpt", "value": "It moves right."},
                           {"from": "human", "value": "And the disc?"},
                           {"from": "gpt", "value": "It follows a wave."}]}
OPENAI = {"messages": [{"role": "system", "content": "You see two pictures."},
                       {"role": "user", "content": [{"type": "text", "text": "First: "}, {"type": "image"},
                                                    {"type": "text", "text": " second: "}, {"type": "image"},
                                                    {"type": "text", "text": " Which numbers?"}]},
                       {"role": "assistant", "content": "Both shown."}]}


def runs(segs: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """`segs` with consecutive segments of the same supervision joined: the text and what trains, whatever the cut
    between segments (a Qwen template writes its <|im_start|> and <|im_end|> as segments of their own)."""
    out: list[tuple[str, bool]] = []
    for text, sup in segs:
        if out and out[-1][1] == sup:
            out[-1] = (out[-1][0] + text, sup)
        elif text:
            out.append((str(text), sup))
    return out


def qwen_segments(record: dict, template: str) -> list[tuple[str, bool]]:
    """annotation_segments(record, template) as `runs`, after checking that the template's turn tokens, and only
    they, are `Control` segments (the records here spell none in their text)."""
    segs = annotation_segments(record, template)
    controls = [t for t, _ in segs if isinstance(t, Control)]
    assert controls and set(controls) <= {"<|im_start|>", "<|im_end|>"}
    assert len(controls) == sum(t.count("<|im_start|>") + t.count("<|im_end|>") for t, _ in segs)
    return runs(segs)


def test_turns_render_as_user_and_assistant_lines_with_only_answers_supervised():
    assert annotation_segments(LLAVA) == [
        ("User: <image>\nWhat does the square do?\n", False), ("Assistant: ", False), ("It moves right.\n", True),
        ("User: And the disc?\n", False), ("Assistant: ", False), ("It follows a wave.\n", True)]
    assert annotation_segments(OPENAI) == [
        ("You see two pictures.\n", False), ("User: First: <image> second: <image> Which numbers?\n", False),
        ("Assistant: ", False), ("Both shown.\n", True)]


def test_qwen3_writes_its_thinking_blocks():
    """chat_template=qwen3 against Qwen3's chat template, written out here by hand from its rules (its
    tokenizer_config.json): a conversation's last assistant turn carries "<think>\n{thinking}\n</think>\n\n", empty
    without thinking (what transformers renders for [user "Hi", assistant "Hello"]:
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n"); assistant
    turns before the last user turn lose theirs; the thinking comes from reasoning_content or from the text's own
    <think> ... </think>."""
    U = lambda text: (f"<|im_start|>user\n{text}<|im_end|>\n", False)  # noqa: E731
    A = lambda text: [("<|im_start|>assistant\n", False), (f"{text}<|im_end|>", True), ("\n", False)]  # noqa: E731
    assert qwen_segments(LLAVA, "qwen3") == runs([
        U("<image>\nWhat does the square do?"), *A("It moves right."), U("And the disc?"),
        *A("<think>\n\n</think>\n\nIt follows a wave.")])
    reasoned = {"messages": [
        {"role": "system", "content": "Count."},
        {"role": "user", "content": "How many frames?"},
        {"role": "assistant", "content": "42", "reasoning_content": "One per half second."},
        {"role": "user", "content": "And seconds?"},
        {"role": "assistant", "content": "\n21", "reasoning_content": "\n42 frames at 2 fps.\n"},
        {"role": "assistant", "content": "Exactly."}]}
    assert qwen_segments(reasoned, "qwen3") == runs([
        ("<|im_start|>system\nCount.<|im_end|>\n", False), U("How many frames?"), *A("42"), U("And seconds?"),
        *A("<think>\n42 frames at 2 fps.\n</think>\n\n21"), *A("<think>\n\n</think>\n\nExactly.")])
    inline = {"conversations": [
        {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "<think>\nhidden\n</think>\n\nA1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "<think>why</think>A2"}]}
    assert qwen_segments(inline, "qwen3") == runs([U("Q1"), *A("A1"), U("Q2"), *A("<think>\nwhy\n</think>\n\nA2")])
    # the other templates write the text as it is and leave reasoning_content out, as before
    assert qwen_segments(reasoned, "qwen")[1] == ("42<|im_end|>", True)
    assert ("<think>why</think>A2\n", True) in annotation_segments(inline)


WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
# one agentic exchange in the OpenAI form and as LLaMA-Factory's ShareGPT writes it (tools as a JSON string, the
# call as a "function_call" turn, the result as an "observation")
TOOL_OPENAI = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3 °C."}]}
TOOL_SHAREGPT = {"tools": json.dumps([WEATHER]), "conversations": [
    {"from": "human", "value": "Weather in Oslo?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
    {"from": "observation", "value": "3"}, {"from": "gpt", "value": "3 °C."}]}


def test_tool_use_in_both_forms_and_each_template(tmp_path):
    """Tool use (docs/data.md "Conversations"): written out by hand from Qwen's tool layout (Qwen2.5's and Qwen3's
    templates; test_hf_tokenizer.py checks the ids against transformers rendering Qwen3's rules): the tools in a
    system turn, each call as <tool_call> JSON in the assistant's trained text, the results as an untrained user
    turn of <tool_response> blocks. The ShareGPT form gives the same segments as the OpenAI form, and ingest
    takes both as text-only samples."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    tools = ('<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
             'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n'
             '{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}\n'
             '</tools>\n\nFor each function call, return a json object with function name and arguments within '
             '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
             '<args-json-object>}\n</tool_call><|im_end|>\n')
    U = lambda text: (f"<|im_start|>user\n{text}<|im_end|>\n", False)  # noqa: E731
    A = lambda text: [("<|im_start|>assistant\n", False), (f"{text}<|im_end|>", True), ("\n", False)]  # noqa: E731
    result = ("<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n", False)
    as_object = {**TOOL_SHAREGPT, "conversations": [dict(t, value=json.loads(t["value"])) if t["from"] == "function_call"
                                                     else t for t in TOOL_SHAREGPT["conversations"]]}
    for record in (TOOL_OPENAI, TOOL_SHAREGPT, as_object):
        assert qwen_segments(record, "qwen3") == runs([
            (tools, False), U("Weather in Oslo?"), *A(call), result, *A("<think>\n\n</think>\n\n3 °C.")])
        assert qwen_segments(record, "qwen") == runs([(tools, False), U("Weather in Oslo?"), *A(call), result,
                                                      *A("3 °C.")])
        assert annotation_segments(record) == [
            ('Tools:\n{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": '
             '"string"}}}}\n', False), ("User: Weather in Oslo?\n", False), ("Assistant: ", False),
            (call + "\n", True), ("Tool: 3\n", False), ("Assistant: ", False), ("3 °C.\n", True)]
    ann = tmp_path / "a.jsonl"
    ann.write_text(json.dumps(TOOL_OPENAI) + "\n" + json.dumps(TOOL_SHAREGPT) + "\n")
    got = read_annotations(str(ann))
    assert len(got.texts) == 2 and not got.problems


@pytest.mark.parametrize("record,problem", [
    ({"conversations": [], "video": "a.mp4"}, "'conversations' must be a non-empty list of turns"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, "from 'bot' is not one of"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]}, "value is int, not text"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "'messages' has no assistant turn: nothing to train on"),
    ({"messages": [{"role": "assistant", "content": [{"type": "audio"}]}]}, "is not text, image or video"),
    ({"messages": [{"role": "assistant", "content": "x", "reasoning_content": ["r"]}]},
     "reasoning_content is list, not text"),
    ({"messages": [{"role": "user", "content": "x", "reasoning_content": "r"}, {"role": "assistant", "content": "y"}]},
     "reasoning_content in a user turn"),
    ({"messages": [{"role": "assistant", "content": "x"}], "conversations": [{"from": "gpt", "value": "y"}]},
     "both 'conversations' and 'messages'"),
    ({**TOOL_OPENAI, "tools": "[{"}, "'tools' is a string but not JSON"),
    ({**TOOL_OPENAI, "tools": {"name": "f"}}, "'tools' must be a list of function signatures"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}, {"role": "assistant", "content": "y"}]},
     "tool_calls in a user turn"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "is not {'name': str, 'arguments': a JSON string or an object}"),
    ({"conversations": [{"from": "function_call", "value": "get_weather(Oslo)"}, {"from": "gpt", "value": "y"}]},
     "a function_call's value is not JSON"),
    ({"conversations": [{"from": "function_call", "value": 7}, {"from": "gpt", "value": "y"}]},
     "a tool call 7 is not {'name': str"),
    ({"messages": [{"role": "tool", "content": None}, {"role": "assistant", "content": "y"}]},
     "content is NoneType, not text"),
    # a speaker that is a list or an object, or none: ingest stopped with "unhashable type" naming no line
    ({"messages": [{"role": ["user"], "content": "x"}, {"role": "assistant", "content": "y"}]},
     "'messages'[0]: role ['user'] is not one of"),
    ({"conversations": [{"from": {"name": "human"}, "value": "x"}, {"from": "gpt", "value": "y"}]},
     "'conversations'[0]: from {'name': 'human'} is not one of"),
    ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}, "'messages'[0]: role None is not one of"),
])
def test_malformed_conversations_are_reported_by_line(tmp_path, record, problem):
    assert problem in conversation_turns(record)
    ann = tmp_path / "a.jsonl"
    ann.write_text(json.dumps(record) + "\n")
    got = read_annotations(str(ann))
    assert not (got.videos or got.images or got.texts) and len(got.problems) == 1
    assert got.problems[0].startswith(f"{ann}:1: ") and problem in got.problems[0]


@pytest.fixture(scope="module")
def conv_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv")
    vids, ann = make_synthetic_videos(out, 1, seed=4, max_seconds=2.0)
    records = [dict(json.loads(ann.read_text().splitlines()[0]), **LLAVA)]
    records[0] = {k: v for k, v in records[0].items() if k not in ("caption", "events", "qa")}
    a, b = write_image(vids / "a", 7), write_image(vids / "b", 8)
    records.append({"images": [a["image"], b["image"]], **OPENAI, "numbers": [a["image_number"], b["image_number"]]})
    records.append({"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]})
    ann.write_text("".join(json.dumps(r) + "\n" for r in records))
    ingest(IngestOptions(videos=str(vids), annotations=str(ann), out=str(out / "shards"), progress=False, workers=1))
    return out / "shards", records


def test_conversations_train_on_videos_images_and_text_alone(conv_shards, tmp_path):
    shards, records = conv_shards
    cfg = small_cfg(shards, tmp_path, seq_len=1024, num_epochs=1, max_image_tokens=24)
    loader = VideoPackedLoader(cfg, seed=0)
    kinds = {}
    answers = {"video": "It moves right.\nIt follows a wave.\n", "image": "Both shown.\n", "text": "Hi.\n"}
    for p, d, rec, doc, frames, text in documents(loader):
        kinds[rec.kind] = text
        a, b = int(p.cu_seqlens[d]), int(p.cu_seqlens[d + 1])
        supervised = loader.tokenizer.decode(p.labels[a:b][p.loss_mask[a:b] > 0].tolist())
        assert supervised == answers[rec.kind] + "<eos>", (rec.kind, supervised)     # the answers alone
        if rec.kind == "image":
            assert [read_counter(frames[k], 10) for k in range(2)] == records[1]["numbers"]
    video = kinds["video"]
    assert video.endswith("<vision_end>User: What does the square do?\nAssistant: It moves right.\n"
                          "User: And the disc?\nAssistant: It follows a wave.\n<eos>"), video   # placeholder gone
    assert "<image>" not in video
    image = kinds["image"]
    assert image.startswith("<bos>You see two pictures.\nUser: First: <vision_start><image_pad>") and image.endswith(
        "<vision_end> Which numbers?\nAssistant: Both shown.\n<eos>"), image
    assert image.count("<vision_start>") == 2 and "<vision_end> second: <vision_start>" in image
    assert kinds["text"] == "<bos>User: Say hi.\nAssistant: Hi.\n<eos>"


def test_a_conversation_cut_to_max_text_tokens_is_counted_and_logged(tmp_path, caplog):
    """A video's or an image sample's conversation longer than max_text_tokens is cut, as docs/data.md says, but the
    cut was neither counted nor logged (a text-only sample's is): an SFT set whose later turns never trained looked
    whole. The byte tokenizer makes the count a worked number: "User: Q?\\n" (9 bytes) + "Assistant: " (11) + 600
    "A"s + "\\n" = 621 tokens, of which max_text_tokens = 256 stay, 365 cut, for the video and for the image."""
    vids, ann = make_synthetic_videos(tmp_path, 1, seed=4, max_seconds=2.0)
    video = json.loads(ann.read_text().splitlines()[0])["video"]
    conv = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A" * 600}]}
    image = write_image(vids / "a", 7)["image"]
    short = {"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]}
    ann.write_text("".join(json.dumps(r) + "\n" for r in ({"video": video, **conv}, {"image": image, **conv}, short)))
    ingest(IngestOptions(videos=str(vids), annotations=str(ann), out=str(tmp_path / "shards"), progress=False,
                         workers=1))
    cfg = small_cfg(tmp_path / "shards", tmp_path, seq_len=1024, num_epochs=1, max_image_tokens=24)
    assert cfg.max_text_tokens == 256
    loader = VideoPackedLoader(cfg, seed=0)
    with caplog.at_level("WARNING"):
        docs = {rec.kind: text for _, _, rec, _, _, text in documents(loader)}
    assert docs["video"].endswith("<vision_end>User: Q?\nAssistant: " + "A" * (256 - 20) + "<eos>")   # the cut itself
    assert loader.stats["text_tokens_cut"] == 2 * 365
    assert "the text of 2 video or image sample(s) was cut to fit, 730 tokens cut in all" in caplog.text
    assert "text-only sample(s)" not in caplog.text          # the short conversation alone is whole


def test_a_conversation_marking_pictures_it_does_not_have_is_reported(tmp_path):
    """LLaVA's data whose record lost its image field, or an OpenAI image part without an image: a text-only sample
    kept the marker as the string "<image>" and trained its answer on a picture never shown ("User: <image>What is
    shown?\\nAssistant: A cat."); a video part in an image sample's conversation stayed the string "<video>". Such
    records are reported by line and left out; a free 'text' that spells "<video>" (an HTML page) is still text."""
    recs = [{"conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A dog."}]},
            {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
                          {"role": "assistant", "content": "A cat."}]},
            {"image": "a.png", "messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                                                                          "text": "What?"}]},
                                            {"role": "assistant", "content": "x"}]},
            {"text": "Embed it with <video> and </video> tags."}, LLAVA]
    ann = tmp_path / "a.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = read_annotations(str(ann))
    assert [t[2] for t in got.texts] == [4] and not got.images and len(got.problems) == 4, got.problems
    assert got.problems[0].startswith(f"{ann}:1: 1 '<image>' marker(s) or part(s) in its prompt, questions or user "
                                      f"turns, but no 'image'")
    assert got.problems[1].startswith(f"{ann}:2: 1 '<image>' marker(s)")
    assert got.problems[2].startswith(f"{ann}:3: 1 '<video>' marker(s) (or video parts) in the prompt, questions or "
                                      f"user turns of an image sample")
    assert got.problems[3].startswith(f"{ann}:5: 1 '<image>' marker(s)")   # LLaVA's video data needs its video field


def test_a_video_marker_in_an_image_samples_prompt_or_question_is_reported(tmp_path):
    """An image sample whose prompt or QA question spells "<video>" (a video QA set converted to frames as images) was
    stored without a word: the marker stayed the string "<video>" and the answer trained on a video never shown.
    Ingest now reports it by line and leaves the record out, as it does one in a user turn and a text-only record's
    markers. Its free text (an interleaved page that writes HTML's <video> tag), a caption and an answer keep it as
    words."""
    recs = [{"image": "a.png", "prompt": "<video>\nWhat is shown?", "caption": "A cat."},
            {"images": ["b.png", "c.png"], "qa": [{"question": "<image> <image> <video> What happens?",
                                                   "answer": "A cat leaves."}]},
            {"image": "d.png", "text": "<image> The <video> tag embeds a clip."},
            {"image": "e.png", "prompt": "<image>\nWhat is this tag?", "caption": "The <video> tag.",
             "qa": [{"question": "Which tag?", "answer": "<video>"}]}]
    ann = tmp_path / "a.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = read_annotations(str(ann))
    assert sorted(got.images) == ["d.png", "e.png"] and len(got.problems) == 2, got.problems
    for line, problem in zip((1, 2), got.problems):
        assert problem == (f"{ann}:{line}: 1 '<video>' marker(s) (or video parts) in the prompt, questions or user "
                           f"turns of an image sample (its record names images, no video)"), problem


def test_markers_outside_the_user_turns_are_words_at_ingest_and_in_image_samples(tmp_path):
    """An answer that writes "<image>" or "<video>" (about HTML's tags, or quoting LLaVA's prompts) was counted as a
    marker: an image sample asking "<image>\nWhat is this tag?" and answering "An <image> tag" was left out ("1
    image(s) but 2 '<image>' markers"), a text-only conversation answering "The <image> tag." too ("1 '<image>'
    marker(s) or part(s) in the conversation, but no 'image' ..."). Only the user's markers are markers: both are
    stored, the image stands at the user's marker and the answer keeps its words (the segments written out by hand).
    A picture part in an assistant turn names no place in a user's prompt: reported by line."""
    from data.video.annotations import image_chunks

    asked = {"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this tag?"},
        {"from": "gpt", "value": "An <image> tag; <video> embeds clips."}]}
    text = {"conversations": [{"from": "human", "value": "Which tag embeds a picture?"},
                              {"from": "gpt", "value": "The <image> tag."}]}
    part = {"video": "v.mp4", "messages": [{"role": "user", "content": "Show me."},
                                           {"role": "assistant", "content": [{"type": "video"}]}]}
    ann = tmp_path / "a.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in (asked, text, part)))
    got = read_annotations(str(ann))
    assert list(got.images) == ["a.png"] and [t[2] for t in got.texts] == [2] and not got.videos, got.problems
    assert got.problems == [f"{ann}:3: 'messages'[1]: a 'video' part in a turn of role 'assistant' (pictures stand "
                            f"in user turns; other turns are text); record left out"]
    assert [runs(c) for c in image_chunks(asked, "plain", 1)] == [
        [("User: ", False)], [("\nWhat is this tag?\nAssistant: ", False),
                              ("An <image> tag; <video> embeds clips.\n", True)]]
    assert [runs(c) for c in image_chunks(asked, "qwen", 1)] == [
        [("<|im_start|>user\n", False)], [("\nWhat is this tag?<|im_end|>\n<|im_start|>assistant\n", False),
                                           ("An <image> tag; <video> embeds clips.<|im_end|>", True), ("\n", False)]]


def test_a_text_only_prompt_or_question_marking_a_picture_is_reported(tmp_path):
    """A text-only record whose prompt or question marks a picture ("<image>\nWhat is shown?", a record whose image
    field was lost) was stored, the marker kept as a string and the answer trained on a picture never shown; only a
    conversation's markers were checked. A prompt and a question are where a record places its pictures, as a user
    turn is: such records are reported by line and left out. A free text, a caption or an answer may spell them."""
    recs = [{"prompt": "<image>\nWhat is shown?", "qa": [{"q": "Its colour?", "a": "Red."}]},
            {"qa": [{"q": "<video>\nWhat happens?", "a": "A dog runs."}]},
            {"prompt": "Answer about HTML.", "qa": [{"q": "Which tag embeds a clip?", "a": "The <video> tag."}],
             "text": "Embed it with <video> and </video> tags."}]
    ann = tmp_path / "a.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = read_annotations(str(ann))
    assert [t[2] for t in got.texts] == [3], got.problems
    assert [p.split(": ", 1)[1] for p in got.problems] == [
        f"{c} marker(s) or part(s) in its prompt, questions or user turns, but no 'image', 'images' or 'video' field: "
        f"name the file they stand for, or remove them" for c in ("1 '<image>'", "1 '<video>'")]


@pytest.mark.parametrize("template", ["plain", "qwen"])
def test_a_video_record_marking_more_than_its_video_is_refused(tmp_path, template):
    """A video record names one video; a text with two markers ("<video>" twice, or LLaVA-Video's "<image>" beside a
    "<video>") asks about a second one the sample does not have. The frames took the first marker and the others were
    dropped without a word ("plain": all of them), so the answer trained on a video never shown. Ingest reports the
    record by line with the counts and leaves its video out unless another record of it is well formed; a shard
    written before is a plan reject, `bad_metadata` naming the counts, as an image sample's marker count is. A video
    with one marker (or a content part) or none plans as before."""
    from data.video.config import VideoDataConfig
    from data.video.packing import plan_document
    from data.video.sampling import PlanError
    from data.video.tokenizer import ByteTokenizer

    from .test_sampling import meta

    def conv(first):
        return {"conversations": [{"from": "human", "value": first}, {"from": "gpt", "value": "They differ."}]}

    two, mixed = conv("<video>\nCompare it with <video>."), conv("<video>\n<image>\nWhat changed?")
    part = {"messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]},
                         {"role": "assistant", "content": "A square."}]}
    recs = [{"video": "a.mp4", **two}, {"video": "b.mp4", **mixed}, {"video": "c.mp4", **LLAVA},
            {"video": "a.mp4", **conv("<video>\nWhat moves?")}, {"video": "d.mp4", **part}]
    ann = tmp_path / "a.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = read_annotations(str(ann))
    assert got.problems == [
        f"{ann}:1: 1 video but 2 '<video>' markers in the text (one where the video stands, or none to place it first;"
        f" the others stand for videos or images the record does not name); record left out",
        f"{ann}:2: 1 video but 1 '<video>' and 1 '<image>' markers in the text (one where the video stands, or none to "
        f"place it first; the others stand for videos or images the record does not name); record left out"]
    assert sorted(got.videos) == ["a.mp4", "c.mp4", "d.mp4"] and sorted(got.bad_videos) == ["b.mp4"]
    assert got.videos["a.mp4"]["conversations"][0]["value"] == "<video>\nWhat moves?"

    cfg = VideoDataConfig(seq_len=2048, min_frames=2, min_frame_tokens=4, max_frame_tokens=16, min_video_tokens=16,
                          video_tokens_per_second=24.0, max_text_tokens=300, chat_template=template)
    video, tok = meta(2.0, fps=12.0, width=96, height=64, tb=12288), ByteTokenizer()
    for annotation, counts in ((two, "2 '<video>'"), (mixed, "1 '<video>' and 1 '<image>'")):
        with pytest.raises(PlanError, match=f"^bad_metadata: 1 video but {counts} markers in the text") as e:
            plan_document(uid=0, key="s/0", video=video, annotation=annotation, cfg=cfg, tokenizer=tok, seed=0, epoch=0)
        assert e.value.reason == "bad_metadata"
    for annotation in (LLAVA, part, conv("What moves?")):
        plan = plan_document(uid=0, key="s/0", video=video, annotation=annotation, cfg=cfg, tokenizer=tok, seed=0,
                             epoch=0)
        assert "<video>" not in tok.decode(plan.text_ids) and "<image>" not in tok.decode(plan.text_ids)


@pytest.mark.parametrize("template", ["qwen", "qwen3"])
def test_the_byte_tokenizers_turn_tokens_are_ids_no_text_can_spell(template):
    """The byte tokenizer wrote chat_template qwen's <|im_start|> / <|im_end|> as their bytes, the very bytes an answer
    that spells "<|im_end|>" gives: the model could not tell a turn's end from text about it, and a record could end
    its turn. They are ids of their own now (special_token_offset + 8 and + 9); the document equals the turns written
    out here, each text as its UTF-8 bytes, and the spelled one stays bytes. A vocabulary without room for them is a
    config error naming data.video.vocab_size."""
    from data.video.config import VideoDataConfig
    from data.video.packing import plan_document
    from data.video.tokenizer import build_tokenizer

    cfg = VideoDataConfig(seq_len=512, chat_template=template)
    tok = build_tokenizer(cfg)
    S, E = [tok.special_token_offset + 8], [tok.special_token_offset + 9]
    b = lambda text: list(text.encode("utf-8"))  # noqa: E731
    record = {"conversations": [{"from": "human", "value": "How does a turn end?"},
                                {"from": "gpt", "value": "With <|im_end|>, then <|im_start|>user."}]}
    think = "<think>\n\n</think>\n\n" if template == "qwen3" else ""
    answer = b(think + "With <|im_end|>, then <|im_start|>user.")
    pieces = [(S + b("user\nHow does a turn end?") + E + b("\n") + S + b("assistant\n"), False), (answer + E, True),
              (b("\n"), False)]
    d = plan_document(uid=0, key="s/t", video=None, annotation=record, cfg=cfg, tokenizer=tok, seed=0, epoch=0)
    assert d.text_ids == [i for ids, _ in pieces for i in ids], tok.decode(d.text_ids)
    assert d.text_loss == [s for ids, s in pieces for _ in ids]
    assert tok.decode(S + E) == "<|im_start|><|im_end|>" and [i for i in d.text_ids if i > 255] == (S + E) * 2
    with pytest.raises(ValueError, match=rf"data.video.chat_template={template} writes .* data.video.vocab_size = "
                                         r"265 must be >= 266"):
        build_tokenizer(VideoDataConfig(seq_len=512, chat_template=template, vocab_size=265))
