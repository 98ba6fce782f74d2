"""The text of an annotation record: its (text, supervised) segments, and where its images go.

Torch-free, so that ingest (which checks a record's image markers) and the guarded decode child stay light.
"""
from __future__ import annotations

import json
from typing import NamedTuple

from .images import IMAGE_MARKER

VIDEO_MARKER = "<video>"
THINK_START, THINK_END = "<think>", "</think>"   # Qwen3's thinking block (chat_template=qwen3)
# a turn's speaker in the ShareGPT / LLaVA form ("from") or the OpenAI one ("role") -> how it is rendered;
# "function_call" (ShareGPT as LLaMA-Factory writes tool use) is an assistant turn whose value is the call(s)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "system": "system", "tool": "tool", "observation": "tool", "function_call": "assistant"}
# Qwen's tool layout (Qwen2.5's and Qwen3's chat templates): the tools' signatures in the system turn, each call
# in the assistant's text, the results as a user turn of <tool_response> blocks
TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
               "function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
               "<args-json-object>}\n</tool_call>")
RESPONSE_START, RESPONSE_END = "<tool_response>", "</tool_response>"


class Control(str):
    """A segment's text that a chat template writes as one token of its own (Qwen's "<|im_start|>", "<|im_end|>"): it
    becomes that token's id (`packing._encode_joined`). Every other segment (a record's text, the template's words)
    is read as text, so a record that spells "<|im_end|>" trains on its characters and does not end the turn there.
    The segment functions below keep such a segment whole and of this type."""


IM_START, IM_END = Control("<|im_start|>"), Control("<|im_end|>")


class Verbatim(str):
    """A segment's text in which "<video>" and "<image>" are text, not markers: what the model is taught to write (a
    caption, an event, a QA answer, an assistant turn) and the system and tool turns. A marker stands where a record
    places its pictures: a `prompt`, a QA question, a user turn, a free `text` (an interleaved document); one spelled
    elsewhere (a caption about HTML's "<video> tag", an answer quoting LLaVA's "<image>") keeps its words there. The
    segment functions below leave such a segment whole."""


def _marks(text: str) -> bool:
    """Whether a segment's text can hold a marker (not a template token, not Verbatim)."""
    return not isinstance(text, (Control, Verbatim))


class Turn(NamedTuple):
    """One turn of a conversation: its role (user, assistant, system or tool), text, an assistant's thinking
    (`reasoning_content`, else None) and its tool calls, each written as Qwen writes one:
    '{"name": NAME, "arguments": ARGUMENTS}' (ARGUMENTS a JSON string as given, or the object as JSON)."""
    role: str
    text: str
    reasoning: str | None = None
    calls: tuple[str, ...] = ()


def _json(value) -> str:
    """JSON as Hugging Face chat templates' `tojson` writes it (non-ASCII kept, ", " and ": " separators)."""
    return json.dumps(value, ensure_ascii=False)


def _calls(value, where: str) -> tuple[str, ...] | str:
    """An assistant's tool calls (OpenAI `tool_calls`: [{"type": "function", "function": {"name", "arguments"}}],
    or the call objects themselves; one call alone) as written calls; a string saying what is wrong."""
    calls = value if isinstance(value, list) else [value]
    out = []
    for c in calls:
        f = c.get("function", c) if isinstance(c, dict) else None
        name, args = (f.get("name"), f.get("arguments", {})) if isinstance(f, dict) else (None, None)
        if not isinstance(name, str) or not name or not isinstance(args, (str, dict)):
            return f"{where}: a tool call {c!r} is not {{'name': str, 'arguments': a JSON string or an object}}"
        out.append(f'{{"name": "{name}", "arguments": {args if isinstance(args, str) else _json(args)}}}')
    return tuple(out)


def tool_signatures(annotation: dict) -> list | str:
    """The record's `tools` (a list of function signatures, or that list as a JSON string, as ShareGPT data
    carries it), [] without; a string saying what is wrong."""
    tools = annotation.get("tools")
    if tools is None or tools == "":
        return []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            return f"'tools' is a string but not JSON ({e})"
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        return "'tools' must be a list of function signatures (objects)"
    return tools


def conversation_turns(annotation: dict) -> list[Turn] | str | None:
    """The Turns of a record's `conversations` (ShareGPT / LLaVA-Video: {"from": "human" | "gpt" | "system" |
    "function_call" | "observation", "value": str}) or `messages` (OpenAI: {"role": "user" | "assistant" |
    "system" | "tool", "content": str or a list of parts {"type": "text", "text": ...} / {"type": "image"} /
    {"type": "video"}, which become the "<image>" / "<video>" markers}). `reasoning` is an assistant turn's
    `reasoning_content` string (the field Qwen's and DeepSeek's APIs give the thinking in), else None; `calls` its
    `tool_calls` (a "function_call" turn's value: the call as JSON). None when the record has neither; a string
    saying what is wrong with them (or with the record's `tools`)."""
    conv, msgs = annotation.get("conversations"), annotation.get("messages")
    if conv is None and msgs is None:
        return None
    if conv is not None and msgs is not None:
        return "both 'conversations' and 'messages': give one"
    tools = tool_signatures(annotation)
    if isinstance(tools, str):
        return tools
    name, turns, who, what = ("conversations", conv, "from", "value") if conv is not None else \
        ("messages", msgs, "role", "content")
    if not isinstance(turns, list) or not turns:
        return f"'{name}' must be a non-empty list of turns"
    out = []
    for i, t in enumerate(turns):
        speaker = t.get(who) if isinstance(t, dict) else None
        role = ROLES.get(speaker) if isinstance(speaker, str) else None   # a list or an object names no speaker
        if role is None:
            return (f"'{name}'[{i}]: not a turn {{{who!r}: one of {sorted(ROLES)}, {what!r}: ...}}" if not
                    isinstance(t, dict) else f"'{name}'[{i}]: {who} {t.get(who)!r} is not one of {sorted(ROLES)}")
        body, calls = t.get(what), ()
        if t.get(who) == "function_call":          # ShareGPT tool use: the value is the call(s), as JSON text
            try:
                calls = _calls(json.loads(body) if isinstance(body, str) else body, f"'{name}'[{i}]")
            except json.JSONDecodeError as e:
                calls = f"'{name}'[{i}]: a function_call's value is not JSON ({e})"
            body = ""
        elif t.get("tool_calls") is not None:
            calls = _calls(t["tool_calls"], f"'{name}'[{i}]") if role == "assistant" else \
                f"'{name}'[{i}]: tool_calls in a {role} turn (only an assistant calls tools)"
            if body is None:                       # OpenAI: no content beside the calls
                body = ""
        if isinstance(calls, str):
            return calls
        if isinstance(body, list):                 # OpenAI content parts
            parts = []
            for part in body:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif kind in ("image", "image_url", "video") and role == "user":
                    parts.append(VIDEO_MARKER if kind == "video" else IMAGE_MARKER)
                elif kind in ("image", "image_url", "video"):
                    return (f"'{name}'[{i}]: a {kind!r} part in a turn of role {role!r} (pictures stand in user "
                            f"turns; other turns are text)")
                else:
                    return f"'{name}'[{i}]: a content part {part!r} is not text, image or video"
            body = "".join(parts)
        if not isinstance(body, str):
            return f"'{name}'[{i}]: {what} is {type(body).__name__}, not text"
        reasoning = t.get("reasoning_content")
        if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
            return (f"'{name}'[{i}]: reasoning_content is {type(reasoning).__name__}, not text" if role == "assistant"
                    else f"'{name}'[{i}]: reasoning_content in a {role} turn (only an assistant reasons)")
        out.append(Turn(role, body, reasoning, calls))
    if not any(turn.role == "assistant" for turn in out):
        return f"'{name}' has no assistant turn: nothing to train on"
    return out


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def unpaired_surrogate(value, where: str = "") -> str | None:
    """Where a JSON value holds a string with an unpaired UTF-16 surrogate (a JSON escape such as "\\ud83d" without
    its pair, as cut web text holds: Python's json reads it, but no UTF-8 text, tokenizer or shard holds it), said
    as the field and character; None when it holds none."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
            return None
        except UnicodeEncodeError as e:
            return (f"{where or 'the text'} holds an unpaired surrogate {value[e.start]!r} at character {e.start} "
                    f"(half of a UTF-16 pair, which UTF-8 text cannot hold)")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(k, str) and (found := unpaired_surrogate(k, f"{where} key" if where else "a key")) is not None:
            return found
        found = unpaired_surrogate(v, f"{where}[{k!r}]" if where else repr(k))
        if found is not None:
            return found
    return None


def field_problem(annotation: dict) -> str | None:
    """What is wrong with the types of a record's text fields, naming the field; None when they are well formed:
    `prompt`, `caption` and `text` strings; `events` a list of {"start": seconds, "end": seconds (optional),
    "text": str}; `qa` a list of {"question" (or "q"): str, "answer" (or "a"): str}; and no string of the record
    holding an unpaired surrogate (`unpaired_surrogate`). A field that is absent or null is fine.
    `annotation_segments` would drop a wrong-typed field (or a part of it) without a word, so ingest reports the
    record instead (its conversation is checked by `conversation_turns`)."""
    if (bad := unpaired_surrogate(annotation)) is not None:
        return bad
    for name in ("prompt", "caption", "text"):
        x = annotation.get(name)
        if x is not None and not isinstance(x, str):
            return f"field {name!r} is {type(x).__name__}, not a string"
    events = annotation.get("events")
    if events is not None:
        if not isinstance(events, list):
            return f"field 'events' is {type(events).__name__}, not a list of events"
        for i, e in enumerate(events):
            if not (isinstance(e, dict) and _number(e.get("start")) and _number(e.get("end", e.get("start")))
                    and isinstance(e.get("text"), str)):
                return (f"'events'[{i}] = {json.dumps(e, ensure_ascii=False)[:200]} is not "
                        f"{{'start': seconds (a number), 'end': seconds (optional), 'text': str}}")
    qa = annotation.get("qa")
    if qa is not None:
        if not isinstance(qa, list):
            return f"field 'qa' is {type(qa).__name__}, not a list of {{'question': str, 'answer': str}}"
        for i, item in enumerate(qa):
            q = item.get("question", item.get("q")) if isinstance(item, dict) else None
            a = item.get("answer", item.get("a")) if isinstance(item, dict) else None
            if not (isinstance(q, str) and isinstance(a, str)):
                return (f"'qa'[{i}] = {json.dumps(item, ensure_ascii=False)[:200]} is not "
                        f"{{'question' (or 'q'): str, 'answer' (or 'a'): str}}")
    return None


def has_text(annotation: dict) -> bool:
    """Whether a record holds text to train on by itself (a text-only sample): a `text`, `qa`, `conversations` or
    `messages` field, and some supervised text in its segments that is not blank: the planner's rule (a text-only
    sample without supervised tokens is its `no_text` reject), so that ingest stores no text-only sample the
    planner would reject."""
    if all(annotation.get(k) is None for k in ("text", "qa", "conversations", "messages")):
        return False
    try:
        return any(sup and text.strip() for text, sup in annotation_segments(annotation))
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def _with_calls(answer: str, calls: tuple[str, ...], shown: str | None = None) -> str:
    """An assistant's text (`shown`, by default `answer`) with its tool calls after it, as Qwen writes them: each
    "<tool_call>\n{call}\n</tool_call>", on a line of its own after a non-empty answer."""
    out = answer if shown is None else shown
    for j, call in enumerate(calls):
        out += ("\n" if j or answer else "") + f"<tool_call>\n{call}\n</tool_call>"
    return out


def _turn_segments(role: str, body: str, template: str) -> list[tuple[str, bool]]:
    """One conversation turn as (text, supervised) segments: only an assistant's answer (and its end) trains."""
    if template in ("qwen", "qwen3"):          # Qwen's chat template: <|im_start|>role\n ... <|im_end|>\n
        if role == "assistant":
            return [(IM_START, False), ("assistant\n", False)] + ([(Verbatim(body), True)] if body else []) + [
                (IM_END, True), ("\n", False)]
        turn = f"{role}\n{body}"
        return [(IM_START, False), (turn if role == "user" else Verbatim(turn), False), (IM_END, False), ("\n", False)]
    body = body.rstrip("\n") + "\n"
    if role == "assistant":
        return [("Assistant: ", False), (Verbatim(body), True)]
    if role == "user":
        return [(f"User: {body}", False)]
    return [(Verbatim(body if role == "system" else f"Tool: {body}"), False)]


def split_thinking(body: str, reasoning: str | None) -> tuple[str, str]:
    """An assistant turn's (answer, thinking), as Qwen3's chat template takes them: `reasoning_content` when given,
    else the text before the first "</think>" (after its "<think>"), the answer then being what follows the last
    "</think>"; no "</think>": no thinking."""
    if reasoning is not None:
        return body, reasoning
    if THINK_END not in body:
        return body, ""
    parts = body.split(THINK_END)
    return parts[-1].lstrip("\n"), parts[0].rstrip("\n").split(THINK_START)[-1].lstrip("\n")


def _tool_responses(turns: list[Turn], i: int) -> list[tuple[str, bool]]:
    """Qwen's tool turns from i on, as one user turn of <tool_response> blocks, one per consecutive tool turn."""
    j = i
    while j < len(turns) and turns[j].role == "tool":
        j += 1
    return [(IM_START, False), (Verbatim("user" + "".join(f"\n{RESPONSE_START}\n{t.text}\n{RESPONSE_END}"
                                                         for t in turns[i:j])), False), (IM_END, False), ("\n", False)]


def conversation_segments(turns: list[Turn], template: str, tools: list | None = None) -> list[tuple[str, bool]]:
    """A conversation's turns as (text, supervised) segments, by `template` (annotation_segments says which).
    "qwen3" writes Qwen3's chat template: the assistant turns after the last user query (a user turn that is not
    tool results) carry their thinking as "<think>\n{thinking}\n</think>\n\n" before the answer, and the
    conversation's last turn an empty block when it has none (Qwen3's non-thinking form); earlier assistant turns
    keep their answer alone, as Qwen3 shows a conversation's history. The thinking trains with the answer.
    With `tools` (function signatures), "qwen" and "qwen3" open with Qwen's system turn listing them (a first
    system turn's text before them); an assistant's tool calls follow its answer and train with it; tool turns are
    written as a user turn of <tool_response> blocks, not trained. "plain" lists the tools on a "Tools:" line each,
    writes the calls as Qwen does and a tool turn as "Tool: ..."."""
    tools = tools or []
    if template not in ("qwen", "qwen3"):
        segs = [(Verbatim("Tools:\n" + "".join(_json(t) + "\n" for t in tools)), False)] if tools else []
        for t in turns:
            body = t.text if t.role != "assistant" else _with_calls(t.text.rstrip("\n") if t.calls else t.text, t.calls)
            segs += _turn_segments(t.role, body, template)
        return segs
    segs = []
    if tools:
        has_system = turns[0].role == "system"
        system = turns[0].text + "\n\n" if has_system else ""
        segs += [(IM_START, False), (Verbatim(f"system\n{system}{TOOLS_INTRO}" + "".join("\n" + _json(t) for t in tools)
                                              + TOOLS_OUTRO), False), (IM_END, False), ("\n", False)]
        turns = turns[1:] if has_system else turns
    queries = [i for i, t in enumerate(turns) if t.role == "user"
               and not (t.text.startswith(RESPONSE_START) and t.text.endswith(RESPONSE_END))]
    last_query = queries[-1] if queries else len(turns) - 1
    for i, t in enumerate(turns):
        if t.role == "tool":
            if i == 0 or turns[i - 1].role != "tool":   # one turn for the group
                segs += _tool_responses(turns, i)
            continue
        if t.role != "assistant":
            segs += _turn_segments(t.role, t.text, template)
            continue
        if template == "qwen":
            segs += _turn_segments(t.role, _with_calls(t.text, t.calls), template)
            continue
        answer, thinking = split_thinking(t.text, t.reasoning)
        if i > last_query and (i == len(turns) - 1 or thinking):
            text = (f"{THINK_START}\n{thinking.strip(chr(10))}\n{THINK_END}\n\n"
                    + _with_calls(answer, t.calls, shown=answer.lstrip("\n")))
        else:
            text = _with_calls(answer, t.calls)
        segs += _turn_segments(t.role, text, template)
    return segs


def annotation_segments(annotation: dict, template: str = "plain", *, lead: str = "") -> list[tuple[str, bool]]:
    """(text, supervised) segments of an annotation record, in a fixed order: prompt, caption, events, QA pairs,
    the conversation, then free text. A conversation's turns are written by `template`: "plain" = "User: ...",
    then "Assistant: " and the answer (a system turn as it is); "qwen" = Qwen's chat template, each turn
    "<|im_start|>{role}\n{text}<|im_end|>\n" (the answer and its <|im_end|> supervised); "qwen3" = that, with
    Qwen3's thinking blocks (`conversation_segments`). `lead`: what the first user turn's text opens with (markers:
    `video_segments`, `image_chunks`). The segments where a "<video>" / "<image>" is text, not a marker, are
    `Verbatim` (the caption, events, answers, and the turns that are not the user's)."""
    segs: list[tuple[str, bool]] = []
    prompt = annotation.get("prompt")
    if isinstance(prompt, str) and prompt:
        segs.append((prompt.rstrip("\n") + "\n", False))
    cap = annotation.get("caption")
    if isinstance(cap, str) and cap:
        segs += [("Caption: ", False), (Verbatim(cap.rstrip("\n") + "\n"), True)]
    events = annotation.get("events") or []
    if events:
        segs.append(("Events:\n", False))
        for e in events:
            try:
                s, t, txt = float(e["start"]), float(e.get("end", e["start"])), str(e["text"])
            except (KeyError, TypeError, ValueError):
                continue
            segs.append((Verbatim(f"<{s:.1f}s-{t:.1f}s> {txt}\n"), True))
    for qa in annotation.get("qa") or []:
        if not isinstance(qa, dict):
            continue
        q = qa.get("question", qa.get("q"))
        a = qa.get("answer", qa.get("a"))
        if q is None or a is None:
            continue
        segs += [(f"Q: {q}\nA: ", False), (Verbatim(f"{a}\n"), True)]
    turns = conversation_turns(annotation)
    if isinstance(turns, list):
        first = next((i for i, t in enumerate(turns) if t.role == "user"), None) if lead else None
        if first is not None:
            turns[first] = turns[first]._replace(text=lead + turns[first].text)
        segs += conversation_segments(turns, template, tool_signatures(annotation))
    text = annotation.get("text")
    if isinstance(text, str) and text:
        segs.append((text, True))              # free text (a text-only sample's document), supervised whole
    return segs


def split_at_image_markers(segs: list[tuple[str, bool]]) -> list[list[tuple[str, bool]]]:
    """The (text, supervised) segments split at every IMAGE_MARKER: k markers give k + 1 chunks (some empty)."""
    chunks: list[list[tuple[str, bool]]] = [[]]
    for text, sup in segs:
        if not _marks(text):                   # a template's token or Verbatim text: no marker, kept whole
            chunks[-1].append((text, sup))
            continue
        for j, part in enumerate(text.split(IMAGE_MARKER)):
            if j:
                chunks.append([])
            if part:
                chunks[-1].append((part, sup))
    return chunks


def without_markers(segs: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """The segments of a video's record without its visual placeholders ("<video>", and "<image>", which
    LLaVA-Video's conversations use for the video): where the frames precede the text ("plain", `video_segments`).
    A marker's own line goes with it."""
    out = []
    for text, sup in segs:
        for m in (VIDEO_MARKER, IMAGE_MARKER) if _marks(text) else ():
            text = text.replace(m + "\n", "").replace(m, "")
        if text:
            out.append((text, sup))
    return out


def video_segments(annotation: dict, template: str) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """A video record's (text, supervised) segments before its frames and after them.

    Under Qwen's templates ("qwen", "qwen3") the frames stand where the text's first "<video>" or "<image>" marker
    does (LLaVA-Video marks the video with "<image>"), as Qwen2-VL's, Qwen2.5-VL's and Keye-VL's chat templates and
    processors put a video's `<|vision_start|>...<|vision_end|>` inside the user turn at its marker or content part;
    the marker's line break stays, as those tools replace the marker alone (the image path does so too). Without a
    marker they stand at the start of the first user turn's text (where those templates write a video part that
    opens the content); with no user turn either, before all text. A record with a second marker is refused
    (`video_marker_problem`). "plain" keeps the frames before all text and drops the marker with its line
    (`without_markers`): no model's chat template, and the layout of every run made before."""
    segs = annotation_segments(annotation, template)
    if template not in ("qwen", "qwen3"):
        return [], without_markers(segs)
    if not any(m in t for t, _ in segs if _marks(t) for m in (VIDEO_MARKER, IMAGE_MARKER)):
        segs = annotation_segments(annotation, template, lead=VIDEO_MARKER)
    for i, (text, sup) in enumerate(segs):
        found = [(text.find(m), m) for m in (VIDEO_MARKER, IMAGE_MARKER) if m in text and _marks(text)]
        if found:
            at, marker = min(found)
            rest = text[at + len(marker):]
            return (segs[:i] + ([(text[:at], sup)] if at else []),
                    without_markers(([(rest, sup)] if rest else []) + segs[i + 1:]))
    return [], segs


def image_chunks(annotation: dict, template: str, n: int) -> list[list[tuple[str, bool]]]:
    """An image sample's (text, supervised) segments before its first image, between its images and after the last
    (k markers: k + 1 chunks; the planner checks k = n). Image i stands where the text's i-th "<image>" marker does.
    Without a marker, under Qwen's templates ("qwen", "qwen3") the n images stand at the start of the first user
    turn's text, as Qwen2-VL's and Keye-VL's templates write image parts that open the content (and ms-swift adds
    the markers of a record that has none); with no user turn, or under "plain", before all text."""
    chunks = split_at_image_markers(annotation_segments(annotation, template))
    if len(chunks) == 1 and template in ("qwen", "qwen3"):
        chunks = split_at_image_markers(annotation_segments(annotation, template, lead=IMAGE_MARKER * n))
    return [[] for _ in range(n)] + chunks if len(chunks) == 1 else chunks


def vision_moved(annotation: dict, template: str, n_images: int = 0) -> bool:
    """Whether a video record's (`n_images` 0) or an image sample's document is written otherwise than before its
    frames or images stood in the user turn: a video's frames before all of its text with every marker dropped, an
    image sample's images at its markers, else before all text."""
    segs = annotation_segments(annotation, template)
    if n_images:
        chunks = split_at_image_markers(segs)
        return image_chunks(annotation, template, n_images) != (chunks if len(chunks) > 1 else [[]] * n_images + chunks)
    before, after = video_segments(annotation, template)
    return bool(before) or after != without_markers(segs)


def markers_moved(annotation: dict, template: str) -> bool:
    """Whether a video's or an image sample's document is written otherwise than when "<video>" and "<image>" were
    markers wherever the record spelled them: one of them in a caption, an event, an answer, or a system, assistant or
    tool turn (now its text: `Verbatim`), or a picture part in a turn that is not the user's (now a malformed
    conversation, which the planner refuses)."""
    if isinstance(conversation_turns(annotation), str):
        return True
    return any(m in t for t, _ in annotation_segments(annotation, template) if isinstance(t, Verbatim)
               for m in (VIDEO_MARKER, IMAGE_MARKER))


def spells_special(annotation: dict, template: str, specials) -> bool:
    """Whether a record's text spells one of `specials` (a tokenizer's special tokens, "<|im_end|>"): with its markers
    or without them, in any stretch between the template's own tokens (`Control`), which a tokenizer that reads
    special tokens in a text would have read as one."""
    if not specials:
        return False
    stretches, cur = [], []
    for text, _ in annotation_segments(annotation, template) + [(Control(""), False)]:
        if isinstance(text, Control):
            stretches.append("".join(cur))
            cur = []
        else:
            cur.append(text)
    for s in stretches:
        bare = s.replace(VIDEO_MARKER, "").replace(IMAGE_MARKER, "")
        if any(t in s or t in bare for t in specials):
            return True
    return False


def image_marker_count(annotation: dict) -> int:
    return sum(t.count(IMAGE_MARKER) for t, _ in annotation_segments(annotation) if _marks(t))


def video_marker_problem(annotation: dict) -> str | None:
    """What is wrong with a video record's visual markers, said with their counts: its text names one video, so it
    holds one "<video>" or "<image>" marker (LLaVA-Video marks the video with "<image>"; a content part of type video
    or image counts as one) where the frames stand, or none (they stand first); None when it does. More would stand
    for videos or images the record does not name: the frames took the first, the others were dropped without a
    word, and the answers trained on what was never shown (transformers' Qwen2-VL processor and model fail on such a
    prompt too)."""
    counts = {m: sum(t.count(m) for t, _ in annotation_segments(annotation) if _marks(t))
              for m in (VIDEO_MARKER, IMAGE_MARKER)}
    if sum(counts.values()) <= 1:
        return None
    found = " and ".join(f"{c} {m!r}" for m, c in counts.items() if c)
    return (f"1 video but {found} markers in the text (one where the video stands, or none to place it first; the "
            f"others stand for videos or images the record does not name)")

