"""The text of an annotation record: its (text, supervised) segments, and where its images go.

Torch-free, so that ingest (which checks a record's image markers) and the guarded decode child stay light.
"""
from __future__ import annotations

from .images import IMAGE_MARKER


def annotation_segments(annotation: dict) -> list[tuple[str, bool]]:
    """(text, supervised) segments of an annotation record, in a fixed order."""
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


def image_marker_count(annotation: dict) -> int:
    return sum(t.count(IMAGE_MARKER) for t, _ in annotation_segments(annotation))
