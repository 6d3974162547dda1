"""One record to one sample: :class:`SampleBuilder` renders the record with the chat template,
tokenises it, loads and checks its images and computes their scales, or raises
:class:`~megatron_navil.data.indexer.settings.Skip` with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from megatron_navil.data.images import ImageRejected, prepare_image
from megatron_navil.data.indexer.settings import Skip
from megatron_navil.data.shards.samples import ImageEntry, image_cost
from megatron_navil.data.templates import IMAGE_MARK, ROLES, Renderer, SampleRejected
from megatron_navil.data.tokenizer import TextTokenizer
from megatron_navil.ops.geometry import ImageGeometry


@dataclass
class Built:
    ids: list[int]
    mask: list[bool]
    images: list[ImageEntry]
    bytes_in: int


class SampleBuilder:
    """Turns one record into a sample or raises :class:`Skip`.

    ``require_target`` (the indexer's default): a record whose trained-on text is empty or
    whitespace (every assistant answer, the caption, the document's text) is a ``no_target``
    skip. Inference prompts (``inference.inputs.image_inputs``) end with an empty assistant
    answer on purpose and pass ``False``.
    """

    def __init__(self, plan: dict[str, Any], tok: TextTokenizer, require_target: bool = True):
        self.require_target = require_target
        s = plan["settings"]
        self.settings = s
        self.img = s["image"]
        self.geometry = ImageGeometry.from_manifest(s["image"])
        self.renderer = Renderer(tok, s["template"], s["system"])
        self.tok = tok

    @lru_cache(maxsize=4096)  # noqa: B019 (one builder per process, bounded)
    def _geometry(self, h: int, w: int) -> tuple[tuple, tuple]:
        g = self.geometry
        size = f"{w} x {h} (W x H)"
        long, short = max(h, w), min(h, w)
        if float(long) > float(g.max_aspect) * float(short):  # the ops' own test, exactly
            raise Skip("bad_aspect", f"{size}: aspect ratio {long / short:.1f} > {g.max_aspect:g}")
        try:
            scales = g.scales(h, w)
        except ValueError as exc:  # e.g. a thin image whose upsampling passes the side limit
            msg = re.sub(r"\b(smart_resize|scales_for_image): ", "", str(exc))
            msg = re.sub(r"(?:image )?\d+x\d+ ?", "", msg).strip()
            raise Skip("bad_aspect", f"{size}: {msg}") from None
        grids = tuple(g.grid(a, b) for a, b in scales)
        return tuple(tuple(x) for x in scales), grids

    def image(self, raw: bytes, name: str = "") -> ImageEntry:
        """``name`` (the image's path in its record) prefixes a skip's detail."""
        where = f"{name}: " if name else ""
        try:
            p = prepare_image(raw)
        except ImageRejected as exc:
            raise Skip(exc.reason, where + str(exc).split(": ", 1)[1]) from None
        try:
            scales, grids = self._geometry(p.height, p.width)
        except Skip as skip:
            raise Skip(skip.reason, where + skip.detail) from None
        return ImageEntry(p.data, p.format, (p.height, p.width), scales, grids, p.converted)

    def _load(self, ref: Any, root: str, tar_images: list[bytes] | None) -> bytes:
        if tar_images is not None:
            return tar_images.pop(0)
        if not isinstance(ref, str) or not ref:
            raise Skip("bad_record", f"image path must be a non-empty string, got {ref!r:.60}")
        path = Path(root) / ref
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise Skip("missing_image", f"{ref} not found under {root}") from None
        except OSError as exc:
            raise Skip("missing_image", f"{ref}: {exc.strerror}") from None

    def build(self, obj: Any, root: str, tar_images: list[bytes] | None = None) -> Built:
        if not isinstance(obj, dict):
            raise Skip("bad_record", f"expected a JSON object, got {type(obj).__name__}")
        r = self.renderer
        refs: list[Any]
        targets: list[str]  # the texts the loss is on
        try:
            if "conversations" in obj:
                refs = self._image_refs(obj, tar_images)
                turns = self._turns(obj["conversations"])
                marks = sum(t.count(IMAGE_MARK) for _, t in turns)
                if marks == 0 and len(refs) == 1:
                    k = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
                    if k is None:
                        raise Skip("bad_record", "no user turn to put the image in")
                    turns[k] = ("user", f"{IMAGE_MARK}\n{turns[k][1]}")
                rendered = r.conversation(turns)
                targets = [t for role, t in turns if role == "assistant"]
            elif "texts" in obj or "images" in obj:
                texts, images = obj.get("texts"), obj.get("images")
                if not isinstance(texts, list) or not isinstance(images, list):
                    raise Skip("bad_record", "interleaved 'texts' and 'images' must be lists")
                if len(texts) != len(images):
                    raise Skip("placeholder_mismatch", "'texts' and 'images' differ in length")
                parts, refs = [], []
                for t, im in zip(texts, images, strict=True):
                    if (t is None) == (im is None):
                        raise Skip("bad_record", "each position needs exactly one of text/image")
                    if t is not None:
                        if not isinstance(t, str):
                            raise Skip("bad_record", "interleaved text must be a string")
                        parts.append(("text", t))
                    else:
                        parts.append(("image", None))
                        refs.append(im)
                if tar_images is not None:
                    refs = list(tar_images)
                rendered = r.document(parts)
                targets = [t for kind, t in parts if kind == "text"]
            elif "caption" in obj or ("text" in obj and ("image" in obj or tar_images)):
                cap = obj.get("caption", obj.get("text"))
                if not isinstance(cap, str):
                    raise Skip("bad_record", "caption must be a string")
                refs = self._image_refs(obj, tar_images)
                if len(refs) != 1:
                    raise Skip(
                        "placeholder_mismatch", f"a caption pair needs 1 image, has {len(refs)}"
                    )
                rendered = r.caption(
                    cap, self.settings["caption_format"], self.settings["caption_prompt"]
                )
                targets = [cap]
            elif "text" in obj:
                if not isinstance(obj["text"], str):
                    raise Skip("bad_record", "text must be a string")
                rendered = r.document([("text", obj["text"])])
                refs, targets = [], [obj["text"]]
            else:
                raise Skip("bad_record", "no 'conversations', 'caption', 'text' or 'texts' key")
        except SampleRejected as exc:
            raise Skip(exc.reason, str(exc).split(": ", 1)[1]) from None
        if rendered.placeholders != len(refs):
            raise Skip(
                "placeholder_mismatch",
                f"{rendered.placeholders} <image> placeholders for {len(refs)} images",
            )
        if not any(rendered.mask):
            raise Skip("no_target", "no token to train on (no assistant turn or empty text)")
        if self.require_target and not any(t.strip() for t in targets):
            what = {"conversations": "every assistant answer is", "caption": "the caption is"}
            key = next((k for k in what if k in obj), "")
            raise Skip("no_target", f"{what.get(key, 'the text is')} empty")
        # cheap length check first (text alone), then images
        max_tokens = self.settings["max_tokens"]
        text_len = len(rendered.ids) - len(refs)
        if text_len > max_tokens:
            raise Skip("too_long", f"{text_len} text tokens > --max-tokens {max_tokens}")
        images, bytes_in, total = [], 0, text_len
        pending = list(tar_images) if tar_images is not None else None
        for ref in refs:
            raw = self._load(ref, root, pending)
            bytes_in += len(raw)
            entry = self.image(raw, ref if isinstance(ref, str) else "")
            total += image_cost(entry.grids, self.img["merge"])[0]
            images.append(entry)
        if total > max_tokens:
            raise Skip("too_long", f"{total} LLM tokens > --max-tokens {max_tokens}")
        return Built(rendered.ids, rendered.mask, images, bytes_in)

    @staticmethod
    def _image_refs(obj: dict, tar_images: list[bytes] | None) -> list[Any]:
        if tar_images is not None:
            return list(tar_images)
        ref = obj.get("image")
        if ref is None:
            return []
        return list(ref) if isinstance(ref, list) else [ref]

    @staticmethod
    def _turns(conv: Any) -> list[tuple[str, str]]:
        if not isinstance(conv, list) or not conv:
            raise Skip("bad_record", "'conversations' must be a non-empty list")
        turns = []
        for t in conv:
            if not isinstance(t, dict):
                raise Skip("bad_record", "a turn must be an object")
            role = t.get("from", t.get("role"))
            value = t.get("value", t.get("content"))
            if role not in ROLES or not isinstance(value, str):
                raise Skip(
                    "bad_record", f"bad turn (from={role!r:.30}, value type {type(value).__name__})"
                )
            turns.append((ROLES[role], value))
        return turns
