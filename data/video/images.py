"""Image samples: verification at ingest and decoding at load time (Pillow).

An image is one frame: planned like a video frame (`sampling.plan_image`), encoded by the same ViT
(temporal patch 1), with `<image_pad>` placeholders instead of `<video_pad>` and no timestamp text.

`inspect_image(path)` runs in ingest's guarded child process (isolation.py, op "inspect_image"): it
decodes the whole file, applies the EXIF orientation and returns what planning needs, the size as
displayed. `decode_image(data, height, width)` runs in the loader's worker: bytes of the stored member
-> uint8 [1, 3, height, width] (planar, what `packing.patchify(layout="chw")` takes), resized with
bicubic filtering from the displayed orientation; a JPEG much larger than that is decoded at a reduced DCT
scale first (Pillow's draft mode), as most photos are.
"""
from __future__ import annotations

import io
import os

import numpy as np

from .shards import read_member
IMAGE_MARKER = "<image>"
"""Where an image of a sample with several goes in its text (interleaved image-text documents)."""
MAX_PIXELS = 1 << 28
"""Images above this many pixels (~268M, e.g. 16K x 16K) are rejected as `too_large` rather than decoded."""


class ImageError(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# EXIF orientations that turn the picture a quarter: the stored width is the displayed height
_QUARTER_TURNS = (5, 6, 7, 8)


def _open(src, what: str, draft: tuple[int, int] | None = None):
    """(image as stored, image as displayed, format). `draft` (the displayed width, height wanted): a JPEG is
    decoded at the smallest of its DCT scales (1/1, 1/2, 1/4, 1/8) that is still at least that size, which
    skips most of the decoding of a large photo that is resized down anyway."""
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        img = Image.open(src)
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageError("too_large", f"{what}: {w}x{h} pixels, over {MAX_PIXELS}")
        fmt = img.format
        if draft is not None and fmt == "JPEG":
            dw, dh = draft
            if int(img.getexif().get(0x0112, 1) or 1) in _QUARTER_TURNS:
                dw, dh = dh, dw
            img.draft("RGB", (dw, dh))
        img.load()                                 # the whole file: a truncated one fails here
        oriented = ImageOps.exif_transpose(img)
    except (ImageError, MemoryError):           # a MemoryError is not the file's: isolation.py's out_of_memory
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"{what}: {e}") from None
    except Exception as e:                         # PIL raises OSError, SyntaxError, ValueError, ...
        raise ImageError("decode_error", f"{what}: {type(e).__name__}: {str(e)[:300]}") from None
    return img, oriented, fmt


def _check_integer_range(img, what: str) -> None:
    """A 32-bit integer image (Pillow mode "I") is read as 16-bit grey (what older Pillow opens a 16-bit PNG as):
    ImageError `unsupported_mode` when its values leave 0..65535, which that reading clipped to white (a depth map
    or scan of 20 bits decoded 93% white): such values have no one 8-bit reading to train on. Nor have 32-bit float
    samples (Pillow mode "F", a float TIFF): 0..1 by one convention, 0..255 or any range by others; convert("RGB")
    clipped them to 0..255 and dropped their fractions, so an image of 0..1 decoded black. ImageError
    `unsupported_mode` for those too."""
    if img.mode == "F":
        lo, hi = img.getextrema()
        raise ImageError("unsupported_mode", f"{what}: 32-bit float samples (Pillow mode F) from {lo:.6g} to {hi:.6g}: "
                                             f"store the image with 8 or 16 bits per sample")
    if img.mode != "I":
        return
    lo, hi = img.getextrema()
    if lo < 0 or hi > 65535:
        raise ImageError("unsupported_mode", f"{what}: integer samples (Pillow mode I) from {lo} to {hi}, outside "
                                             f"0..65535: store the image with 8 or 16 bits per sample")


def inspect_image(path: str) -> dict:
    """Metadata of an image file, verified by decoding it whole. Raises ImageError."""
    if not os.path.isfile(path):
        raise ImageError("missing_file", path)
    if os.path.getsize(path) == 0:      # as a video's: Pillow's "cannot identify image file" would not say why
        raise ImageError("empty_file", f"{os.path.basename(path)}: 0 bytes")
    img, oriented, fmt = _open(path, os.path.basename(path))
    _check_integer_range(oriented, os.path.basename(path))
    w, h = oriented.size
    if w < 1 or h < 1:
        raise ImageError("bad_dimensions", f"{w}x{h}")
    return {"kind": "image", "width": int(w), "height": int(h), "format": fmt, "mode": img.mode,
            "stored_width": int(img.size[0]), "stored_height": int(img.size[1]),
            "exif_orientation": int(img.getexif().get(0x0112, 1) or 1),
            "bytes": os.path.getsize(path)}


def decode_image(data: bytes, height: int, width: int, what: str = "image", *, draft: bool = True) -> np.ndarray:
    """uint8 [1, 3, height, width] of the image in `data`, as displayed (EXIF orientation applied), RGB
    (transparent parts composited onto white, palette and grey expanded, 16-bit grey scaled to 8 bits; 32-bit integer
    grey as 16-bit when its values fit, else ImageError `unsupported_mode`, as for 32-bit float samples), resized with
    bicubic filtering. A JPEG at least twice the size in both sides is first decoded at a reduced DCT scale (`_open`'s
    draft; `draft=False`: in full).
    Raises ImageError."""
    from PIL import Image

    _, img, _ = _open(io.BytesIO(data), what, draft=(width, height) if draft else None)
    _check_integer_range(img, what)       # an image stored before ingest checked it
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit grey (a 16-bit PNG opens as "I;16", or "I" with older Pillow): convert() would clip every value
        # over 255 to white instead of scaling, so keep the high byte of each sample
        samples = np.asarray(img)
        key = img.info.get("transparency")
        img = Image.fromarray((np.clip(samples, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8))
        if isinstance(key, int):    # a 16-bit grey PNG's transparent value (tRNS), kept as an alpha band
            img = Image.merge("LA", (img, Image.fromarray(np.where(samples == key, 0, 255).astype(np.uint8))))
    img = _to_rgb(img)
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)[None])


def _to_rgb(img):
    """`img` as RGB, what it shows composited onto white where it is transparent (an alpha band: RGBA, LA, a palette
    with alpha; or a transparent colour: a PNG's or GIF's tRNS), as transformers' image processors (convert_to_rgb)
    and Qwen-VL's and vLLM's loaders give a model at inference. convert("RGB") dropped the alpha and kept whatever
    colour lay under it: a dark logo on a transparent background, stored over black, decoded all black. An alpha of 0
    everywhere is no transparency but a writer's unused fourth byte (32-bit BMPs with an alpha mask): it is dropped,
    as viewers do, rather than leave a white picture."""
    from PIL import Image

    if not any(b in ("A", "a") for b in img.getbands()) and "transparency" not in img.info:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    if rgba.getextrema()[3][1] == 0:
        return rgba.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def decode_member(shard: str, offset: int, size: int, height: int, width: int, what: str = "image") -> np.ndarray:
    """`decode_image` of a tar member read by its byte offset (the loader's worker, or the guarded child).
    Raises ImageError ("read_error" when the bytes cannot be read)."""
    try:
        data = read_member(shard, offset, size)
    except OSError as e:
        raise ImageError("read_error", f"{what}: {str(e)[:300]}") from None
    return decode_image(data, height, width, what=what)
