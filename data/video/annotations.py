"""The text of an annotation record: its (text, supervised) segments, and where its images go.

Torch-free, so that ingest (which checks a record's image markers) and the guarded decode child stay light.
"""
from __future__ import annotations

from .images import IMAGE_MARKER

VIDEO_MARKER = "<video>"
THINK_START, THINK_END = "<think>", "</think>"   # Qwen3's thinking block (chat_template=qwen3)
# a turn's speaker in the ShareGPT / LLaVA form ("from") or the OpenAI one ("role") -> how it is rendered
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "system": "system"}


def conversation_turns(annotation: dict) -> list[tuple[str, str, str | None]] | str | None:
    """(role, text, reasoning) of each turn of a record's `conversations` (ShareGPT / LLaVA-Video: {"from":
    "human" | "gpt" | "system", "value": str}) or `messages` (OpenAI: {"role": "user" | "assistant" | "system",
    "content": str or a list of parts {"type": "text", "text": ...} / {"type": "image"} / {"type": "video"}, which
    become the "<image>" / "<video>" markers}). `reasoning` is an assistant turn's `reasoning_content` string (the
    field Qwen's and DeepSeek's APIs give the thinking in), else None. None when the record has neither; a string
    saying what is wrong with them."""
    conv, msgs = annotation.get("conversations"), annotation.get("messages")
    if conv is None and msgs is None:
        return None
    if conv is not None and msgs is not None:
        return "both 'conversations' and 'messages': give one"
    name, turns, who, what = ("conversations", conv, "from", "value") if conv is not None else \
        ("messages", msgs, "role", "content")
    if not isinstance(turns, list) or not turns:
        return f"'{name}' must be a non-empty list of turns"
    out = []
    for i, t in enumerate(turns):
        role = ROLES.get(t.get(who)) if isinstance(t, dict) else None
        if role is None:
            return (f"'{name}'[{i}]: not a turn {{{who!r}: one of {sorted(ROLES)}, {what!r}: ...}}" if not
                    isinstance(t, dict) else f"'{name}'[{i}]: {who} {t.get(who)!r} is not one of {sorted(ROLES)}")
        body = t.get(what)
        if isinstance(body, list):                 # OpenAI content parts
            parts = []
            for part in body:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif kind in ("image", "image_url", "video"):
                    parts.append(VIDEO_MARKER if kind == "video" else IMAGE_MARKER)
                else:
                    return f"'{name}'[{i}]: a content part {part!r} is not text, image or video"
            body = "".join(parts)
        if not isinstance(body, str):
            return f"'{name}'[{i}]: {what} is {type(body).__name__}, not text"
        reasoning = t.get("reasoning_content")
        if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
            return (f"'{name}'[{i}]: reasoning_content is {type(reasoning).__name__}, not text" if role == "assistant"
                    else f"'{name}'[{i}]: reasoning_content in a {role} turn (only an assistant reasons)")
        out.append((role, body, reasoning))
    if not any(role == "assistant" for role, _, _ in out):
        return f"'{name}' has no assistant turn: nothing to train on"
    return out


def has_text(annotation: dict) -> bool:
    """Whether a record holds text to train on by itself (a text-only sample): a non-empty `text`, `qa` pairs, or
    a well-formed conversation."""
    t = annotation.get("text")
    return ((isinstance(t, str) and bool(t.strip())) or (isinstance(annotation.get("qa"), list) and bool(annotation["qa"]))
            or isinstance(conversation_turns(annotation), list))


def _turn_segments(role: str, body: str, template: str) -> list[tuple[str, bool]]:
    """One conversation turn as (text, supervised) segments: only an assistant's answer (and its end) trains."""
    if template in ("qwen", "qwen3"):          # Qwen's chat template: <|im_start|>role\n ... <|im_end|>\n
        if role == "assistant":
            return [("<|im_start|>assistant\n", False), (f"{body}<|im_end|>", True), ("\n", False)]
        return [(f"<|im_start|>{role}\n{body}<|im_end|>\n", False)]
    body = body.rstrip("\n") + "\n"
    if role == "assistant":
        return [("Assistant: ", False), (body, True)]
    return [(body if role == "system" else f"User: {body}", False)]


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


def conversation_segments(turns: list[tuple[str, str, str | None]], template: str) -> list[tuple[str, bool]]:
    """A conversation's turns as (text, supervised) segments, by `template` (annotation_segments says which).
    "qwen3" writes Qwen3's chat template: the assistant turns after the last user turn carry their thinking as
    "<think>\n{thinking}\n</think>\n\n" before the answer, and the conversation's last turn an empty block when it
    has none (Qwen3's non-thinking form); earlier assistant turns keep their answer alone, as Qwen3 shows a
    conversation's history. The thinking trains with the answer."""
    if template != "qwen3":
        return [seg for role, body, _ in turns for seg in _turn_segments(role, body, template)]
    last_user = max((i for i, (role, _, _) in enumerate(turns) if role == "user"), default=-1)
    segs: list[tuple[str, bool]] = []
    for i, (role, body, reasoning) in enumerate(turns):
        if role != "assistant":
            segs += _turn_segments(role, body, template)
            continue
        answer, thinking = split_thinking(body, reasoning)
        if i > last_user and (i == len(turns) - 1 or thinking):
            thinking, answer = thinking.strip("\n"), answer.lstrip("\n")
            answer = f"{THINK_START}\n{thinking}\n{THINK_END}\n\n{answer}"
        segs += _turn_segments(role, answer, template)
    return segs


def annotation_segments(annotation: dict, template: str = "plain") -> list[tuple[str, bool]]:
    """(text, supervised) segments of an annotation record, in a fixed order: prompt, caption, events, QA pairs,
    the conversation, then free text. A conversation's turns are written by `template`: "plain" = "User: ...",
    then "Assistant: " and the answer (a system turn as it is); "qwen" = Qwen's chat template, each turn
    "<|im_start|>{role}\n{text}<|im_end|>\n" (the answer and its <|im_end|> supervised); "qwen3" = that, with
    Qwen3's thinking blocks (`conversation_segments`)."""
    segs: list[tuple[str, bool]] = []
    prompt = annotation.get("prompt")
    if isinstance(prompt, str) and prompt:
        segs.append((prompt.rstrip("\n") + "\n", False))
    cap = annotation.get("caption")
    if isinstance(cap, str) and cap:
        segs += [("Caption: ", False), (cap.rstrip("\n") + "\n", True)]
    events = annotation.get("events") or []
    if events:
        segs.append(("Events:\n", False))
        for e in events:
            try:
                s, t, txt = float(e["start"]), float(e.get("end", e["start"])), str(e["text"])
            except (KeyError, TypeError, ValueError):
                continue
            segs.append((f"<{s:.1f}s-{t:.1f}s> {txt}\n", True))
    for qa in annotation.get("qa") or []:
        if not isinstance(qa, dict):
            continue
        q = qa.get("question", qa.get("q"))
        a = qa.get("answer", qa.get("a"))
        if q is None or a is None:
            continue
        segs += [(f"Q: {q}\nA: ", False), (f"{a}\n", True)]
    turns = conversation_turns(annotation)
    if isinstance(turns, list):
        segs += conversation_segments(turns, template)
    text = annotation.get("text")
    if isinstance(text, str) and text:
        segs.append((text, True))              # free text (a text-only sample's document), supervised whole
    return segs


def split_at_image_markers(segs: list[tuple[str, bool]]) -> list[list[tuple[str, bool]]]:
    """The (text, supervised) segments split at every IMAGE_MARKER: k markers give k + 1 chunks (some empty)."""
    chunks: list[list[tuple[str, bool]]] = [[]]
    for text, sup in segs:
        for j, part in enumerate(text.split(IMAGE_MARKER)):
            if j:
                chunks.append([])
            if part:
                chunks[-1].append((part, sup))
    return chunks


def without_markers(segs: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """The segments of a video's record without its visual placeholders ("<video>", and "<image>", which
    LLaVA-Video's conversations use for the video): a video's frames precede its text. A marker's own line goes
    with it."""
    out = []
    for text, sup in segs:
        for m in (VIDEO_MARKER, IMAGE_MARKER):
            text = text.replace(m + "\n", "").replace(m, "")
        if text:
            out.append((text, sup))
    return out


def image_marker_count(annotation: dict) -> int:
    return sum(t.count(IMAGE_MARKER) for t, _ in annotation_segments(annotation))
