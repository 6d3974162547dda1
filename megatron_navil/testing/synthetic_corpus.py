"""A small *learnable* image-caption corpus rendered with Pillow, and a tokenizer for it.

Each image (sides ``min_side..max_side`` px, sized for the ``tiny`` config's 4..64 patches) has
a plain background and one or two groups of identical shapes; the caption says exactly what is
drawn, so a model can learn it from the pixels::

    "two red circles on the left and one blue square on the right on a white background."

* shapes: circle, square, triangle; colours: red, green, blue, yellow, purple, orange;
  backgrounds: white, black, gray (never the colour of a shape);
* counts 1..4 per group, written as words; positions: one group at left/right/top/bottom/
  center, two groups left+right or top+bottom (the two differ in shape or colour);
* shapes are placed on a 2x2 grid of cells inside their region, with a seeded jitter, so they
  never overlap and stay inside the image.

Everything is a function of ``seed``: the same call writes the same bytes (PNG with fixed
settings). :func:`train_tokenizer` trains a byte-level BPE (``tokenizers``) of at most 512 ids
(the ``tiny`` config's vocab) on the captions, prompts and chat-template text, with the 12 NaViL
special tokens and the template's control tokens as single special ids.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw

from megatron_navil.config.tokens import CONTROL_TOKENS, SPECIAL_TOKENS

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
COUNT_WORDS = ("one", "two", "three", "four")
SINGLE_REGIONS = ("left", "right", "top", "bottom", "center")
PAIR_REGIONS = (("left", "right"), ("top", "bottom"))
PROMPTS = ("Describe the image.", "What is in the picture?", "What do you see?")


@dataclass(frozen=True)
class Group:
    shape: str
    colour: str
    count: int
    region: str


def _phrase(g: Group) -> str:
    noun = g.shape + ("s" if g.count > 1 else "")
    where = "in the center" if g.region == "center" else f"on the {g.region}"
    return f"{COUNT_WORDS[g.count - 1]} {g.colour} {noun} {where}"


def caption_of(groups: list[Group], background: str) -> str:
    """The deterministic caption of a scene."""
    return " and ".join(_phrase(g) for g in groups) + f" on a {background} background."


def _region_box(region: str, w: int, h: int) -> tuple[float, float, float, float]:
    return {
        "left": (0, 0, w / 2, h),
        "right": (w / 2, 0, w, h),
        "top": (0, 0, w, h / 2),
        "bottom": (0, h / 2, w, h),
        "center": (w / 4, h / 4, 3 * w / 4, 3 * h / 4),
    }[region]


def _draw_group(draw: ImageDraw.ImageDraw, g: Group, w: int, h: int, rng: random.Random) -> None:
    x0, y0, x1, y1 = _region_box(g.region, w, h)
    cw, ch = (x1 - x0) / 2, (y1 - y0) / 2
    r = max(2.0, 0.38 * min(cw, ch))
    cells = rng.sample(range(4), g.count)
    for c in sorted(cells):
        cx = x0 + cw * (c % 2 + 0.5) + rng.uniform(-0.08, 0.08) * cw
        cy = y0 + ch * (c // 2 + 0.5) + rng.uniform(-0.08, 0.08) * ch
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[g.colour]
        if g.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif g.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def make_scene(rng: random.Random, min_side: int, max_side: int) -> tuple[Image.Image, str]:
    """One random image and its caption."""
    w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
    background = rng.choice(sorted(BACKGROUNDS))
    if rng.random() < 0.5:
        regions: tuple[str, ...] = (rng.choice(SINGLE_REGIONS),)
    else:
        regions = rng.choice(PAIR_REGIONS)
    groups: list[Group] = []
    for region in regions:
        while True:
            g = Group(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.randint(1, 4), region)
            if not groups or (g.shape, g.colour) != (groups[0].shape, groups[0].colour):
                break
        groups.append(g)
    img = Image.new("RGB", (w, h), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    for g in groups:
        _draw_group(draw, g, w, h, rng)
    return img, caption_of(groups, background)


def write_corpus(
    out: str | Path,
    num_train: int = 2000,
    num_val: int = 200,
    seed: int = 0,
    fmt: str = "conversations",
    min_side: int = 32,
    max_side: int = 128,
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``val.jsonl``, ``images/{split}/NNNNNN.png`` and
    ``tokenizer.json`` under ``out``; returns their paths. ``fmt``: ``conversations``
    (InternVL JSONL, a prompt and the caption as the answer) or ``captions`` (caption pairs)."""
    if fmt not in ("conversations", "captions"):
        raise ValueError(f"fmt={fmt!r}: must be 'conversations' or 'captions'")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got {min_side}, {max_side}")
    out = Path(out)
    paths = {}
    captions: list[str] = []
    for split, n, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
        rng = random.Random(split_seed)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            img, caption = make_scene(rng, min_side, max_side)
            rel = f"images/{split}/{i:06d}.png"
            img.save(out / rel, format="PNG", compress_level=6)
            captions.append(caption)
            if fmt == "conversations":
                prompt = PROMPTS[rng.randrange(len(PROMPTS))]
                rec = {
                    "id": f"{split}-{i:06d}",
                    "image": rel,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{prompt}"},
                        {"from": "gpt", "value": caption},
                    ],
                }
            else:
                rec = {"id": f"{split}-{i:06d}", "image": rel, "caption": caption}
            lines.append(json.dumps(rec))
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + ("\n" if lines else ""))
    paths["tokenizer"] = out / "tokenizer.json"
    train_tokenizer(captions, paths["tokenizer"])
    return paths


def vocabulary_text() -> list[str]:
    """Every word the captions and prompts can use, plus the template text."""
    words = list(SHAPES) + [s + "s" for s in SHAPES] + list(COLOURS) + list(BACKGROUNDS)
    words += [*list(COUNT_WORDS), "on", "the", "in", "and", "a", "background."]
    words += list(SINGLE_REGIONS)
    return [" ".join(words), *PROMPTS, "system\n", "user\n", "assistant\n", "\n\n"]


def train_tokenizer(texts: list[str], path: str | Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE with the NaViL special and template tokens; ``vocab_size`` ids in all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS) + list(CONTROL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = sorted(set(texts)) + vocabulary_text()
    tok.train_from_iterator(corpus, trainer=trainer)
    Path(path).write_text(tok.to_str(pretty=True))
    return Path(path)


# --------------------------------------------------------------------------------------------
# The caption grammar, read back: parsing, the generator's exact distribution, chance levels

FIELDS = ("groups", "count", "colour", "shape", "position", "background")
"""Fields scored per caption: ``groups`` (one or two groups) and ``background`` once per
caption; ``count``, ``colour``, ``shape`` and ``position`` once per group of the reference."""

_PHRASE = (
    r"(?P<count>{counts}) (?P<colour>{colours}) (?P<shape>{shapes})s? "
    r"(?:on the (?P<side>{sides})|in the center)"
).format(
    counts="|".join(COUNT_WORDS),
    colours="|".join(COLOURS),
    shapes="|".join(SHAPES),
    sides="|".join(r for r in SINGLE_REGIONS if r != "center"),
)
_PHRASE_RE = re.compile(_PHRASE)


def _strip_names(pattern: str) -> str:
    return re.sub(r"\?P<\w+>", "", pattern)


_CAPTION_RE = re.compile(
    rf"(?P<groups>{_strip_names(_PHRASE)}(?: and {_strip_names(_PHRASE)})*)"
    rf" on a (?P<background>{'|'.join(BACKGROUNDS)}) background\."
)


def parse_caption(text: str) -> tuple[list[Group], str] | None:
    """``(groups, background)`` of a caption in the generator's grammar (the inverse of
    :func:`caption_of`; surrounding whitespace ignored), or None when ``text`` is not one.

    Lenient only in the plural ``s`` (``"two red circle"`` parses as two circles): the fields
    are what is scored; exact match is scored on the text itself."""
    m = _CAPTION_RE.fullmatch(text.strip())
    if m is None:
        return None
    groups = []
    for g in _PHRASE_RE.finditer(m.group("groups")):
        region = g.group("side") or "center"
        count = COUNT_WORDS.index(g.group("count")) + 1
        groups.append(Group(g.group("shape"), g.group("colour"), count, region))
    return groups, m.group("background")


def caption_fields(groups: list[Group], background: str) -> dict[str, list]:
    """Per field the values of a scene, in slot order (one per group for the group fields)."""
    return {
        "groups": [len(groups)],
        "count": [COUNT_WORDS[g.count - 1] for g in groups],
        "colour": [g.colour for g in groups],
        "shape": [g.shape for g in groups],
        "position": [g.region for g in groups],
        "background": [background],
    }


FIELD_VALUES: dict[str, tuple] = {
    "groups": (1, 2),
    "count": COUNT_WORDS,
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": SINGLE_REGIONS,
    "background": tuple(BACKGROUNDS),
}
"""The values each field can take in the grammar."""


def _scene_weights() -> tuple[list[tuple[list[Group], str, int]], int]:
    """Every scene :func:`make_scene` can draw as ``(groups, background, weight)``, with
    probability ``weight / denominator`` (exact integers; see :func:`scene_distribution`)."""
    kinds = [(s, c, n) for s in SHAPES for c in sorted(COLOURS) for n in range(1, 5)]
    backgrounds = sorted(BACKGROUNDS)
    others = len(SHAPES) * len(COLOURS) - 1  # (shape, colour) pairs unlike the first group's
    single = Fraction(1, 2) / len(SINGLE_REGIONS) / len(kinds) / len(backgrounds)
    pair = (Fraction(1, 2) / len(PAIR_REGIONS) / len(kinds) / (others * len(COUNT_WORDS))) / len(
        backgrounds
    )
    denominator = math.lcm(single.denominator, pair.denominator)
    w_single, w_pair = int(single * denominator), int(pair * denominator)
    scenes: list[tuple[list[Group], str, int]] = []
    for region in SINGLE_REGIONS:
        for s, c, n in kinds:
            for bg in backgrounds:
                scenes.append(([Group(s, c, n, region)], bg, w_single))
    for first, second in PAIR_REGIONS:
        for s, c, n in kinds:
            for s2, c2, n2 in kinds:
                if (s2, c2) == (s, c):
                    continue
                pair_groups = [Group(s, c, n, first), Group(s2, c2, n2, second)]
                for bg in backgrounds:
                    scenes.append((pair_groups, bg, w_pair))
    return scenes, denominator


@cache
def scene_distribution() -> dict[str, float]:
    """Every caption :func:`make_scene` can produce and its exact probability (enumerated from
    its sampling: one group (p 1/2, region uniform over 5) or two (left+right or top+bottom,
    uniform); shape, colour and count uniform and independent, the second group's
    (shape, colour) uniform over the 17 pairs that differ from the first's; background
    uniform over 3). Image sizes and shape placement do not change the caption."""
    scenes, denominator = _scene_weights()
    return {caption_of(g, bg): w / denominator for g, bg, w in scenes}


@dataclass(frozen=True)
class Chance:
    """Chance levels of one metric."""

    uniform: float
    """Guessing uniformly: 1 / (distinct captions) for exact match, 1 / (values of the
    field) for a field."""
    majority: float
    """The best constant answer under the generator's distribution: the most probable caption
    for exact match; per field and slot (first group, second group) its most probable value,
    averaged over slots with the metric's weights (slots that exist in the reference)."""


@cache
def chance_levels() -> dict[str, Chance]:
    """:class:`Chance` of ``exact`` and every field of :data:`FIELDS`, from
    :func:`scene_distribution`."""
    scenes, denominator = _scene_weights()
    out = {"exact": Chance(1 / len(scenes), max(w for _, _, w in scenes) / denominator)}
    for name in FIELDS:
        mass: dict[tuple[int, object], int] = {}
        slots = 0  # expected number of slots per caption, times the denominator
        for groups, bg, w in scenes:
            for k, value in enumerate(caption_fields(groups, bg)[name]):
                mass[(k, value)] = mass.get((k, value), 0) + w
                slots += w
        best: dict[int, int] = {}
        for (k, _), m in mass.items():
            best[k] = max(best.get(k, 0), m)
        out[name] = Chance(1 / len(FIELD_VALUES[name]), sum(best.values()) / slots)
    return out


def score_captions(pairs: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Accuracy of generated captions against references: ``pairs`` of ``(reference,
    generated)``. Per metric ``{"accuracy", "correct", "total", "chance", "majority"}``:

    * ``exact``: the stripped texts are equal;
    * ``parsed``: the generated text is in the grammar (no chance level: NaN);
    * each of :data:`FIELDS`: per slot of the *reference* (one per caption, or one per group),
      the generated caption's value in the same slot (groups in caption order); a generated
      caption that does not parse, or lacks the slot, is wrong there.
    References must parse (ValueError otherwise)."""
    correct = dict.fromkeys(("exact", "parsed", *FIELDS), 0)
    total = dict.fromkeys(("exact", "parsed", *FIELDS), 0)
    for reference, generated in pairs:
        ref = parse_caption(reference)
        if ref is None:
            raise ValueError(f"reference caption {reference!r} is not in the grammar")
        gen = parse_caption(generated)
        total["exact"] += 1
        total["parsed"] += 1
        correct["exact"] += reference.strip() == generated.strip()
        correct["parsed"] += gen is not None
        ref_fields = caption_fields(*ref)
        gen_fields = caption_fields(*gen) if gen is not None else None
        for name in FIELDS:
            want = ref_fields[name]
            got = gen_fields[name] if gen_fields is not None else []
            total[name] += len(want)
            correct[name] += sum(k < len(got) and got[k] == v for k, v in enumerate(want))
    chance = chance_levels()
    out = {}
    for name in correct:
        levels = chance.get(name)
        out[name] = {
            "accuracy": correct[name] / total[name] if total[name] else float("nan"),
            "correct": correct[name],
            "total": total[name],
            "chance": levels.uniform if levels else float("nan"),
            "majority": levels.majority if levels else float("nan"),
        }
    return out
