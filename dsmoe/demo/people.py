"""A small, learnable synthetic person-retrieval dataset written in the real raw layouts.

Every identity is a unique combination of visual attributes (gender with hair length, upper-body colour and
sleeve length, lower-body colour and garment, bag type and colour, hat or hair colour) drawn on a simple
pedestrian figure. Images of one identity vary in position, scale, pose, background and flip; captions vary in
template and synonyms but always name the identity's attributes. Any two identities differ in at least two
visual attributes, so a small image/text model can learn the task.

Generation is deterministic for a given seed (per-image random streams derived from ``(seed, pid, index)``,
JPEG written with a fixed quality) and idempotent: a stamp file records the arguments of a finished run.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dsmoe.files import write_atomic
from dsmoe.progress import Phase

__all__ = [
    "COLOURS",
    "Identity",
    "describe_person",
    "make_identities",
    "make_synthetic_icfg",
    "make_synthetic_pedes",
    "make_synthetic_rstpreid",
    "render_person",
]

GENERATOR_VERSION = 1
STAMP_NAME = ".synthetic_done"
JPEG_QUALITY = 90
SUPERSAMPLE = 2

# Eight well separated attribute colours (name -> RGB).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "blue": (25, 70, 210),
    "green": (25, 150, 45),
    "yellow": (245, 215, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "purple": (125, 35, 165),
    "orange": (245, 125, 15),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (30, 25, 20),
    "brown": (115, 70, 30),
    "blond": (225, 195, 120),
}
SKIN_TONES: tuple[tuple[int, int, int], ...] = ((240, 200, 165), (205, 155, 115), (150, 100, 65))
SHOE_COLOUR = (45, 40, 40)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Identity:
    """The visual attributes of one synthetic person."""

    pid: int
    gender: str  # "man" (short hair) | "woman" (long hair)
    upper_colour: str
    sleeves: str  # "short" | "long"
    lower_colour: str
    lower: str  # "trousers" | "shorts" | "skirt"
    bag: str  # "none" | "backpack" | "handbag"
    bag_colour: str
    headwear: str  # "hat" | "hair"
    head_colour: str  # a COLOURS name for a hat, a HAIR_COLOURS name for hair
    skin: int

    def visual_key(self) -> tuple[str, ...]:
        """Attributes that are visible in the image (and named in the captions)."""
        bag_colour = self.bag_colour if self.bag != "none" else "-"
        return (
            self.gender,
            self.upper_colour,
            self.sleeves,
            self.lower_colour,
            self.lower,
            self.bag,
            bag_colour,
            self.headwear,
            self.head_colour,
        )


def _random_identity(rng: random.Random, pid: int) -> Identity:
    gender = rng.choice(("man", "woman"))
    lower = rng.choice(("trousers", "shorts", "skirt") if gender == "woman" else ("trousers", "shorts"))
    headwear = rng.choice(("hat", "hair", "hair"))
    head_colour = rng.choice(COLOUR_NAMES) if headwear == "hat" else rng.choice(tuple(HAIR_COLOURS))
    return Identity(
        pid=pid,
        gender=gender,
        upper_colour=rng.choice(COLOUR_NAMES),
        sleeves=rng.choice(("short", "long")),
        lower_colour=rng.choice(COLOUR_NAMES),
        lower=lower,
        bag=rng.choice(("none", "backpack", "handbag")),
        bag_colour=rng.choice(COLOUR_NAMES),
        headwear=headwear,
        head_colour=head_colour,
        skin=rng.randrange(len(SKIN_TONES)),
    )


def make_identities(count: int, seed: int = 0, min_distance: int = 2) -> list[Identity]:
    """Draw ``count`` identities whose visual attributes pairwise differ in at least ``min_distance`` (1 or 2)
    places (2 keeps every pair of people told apart by two attributes; past a few thousand people only 1 works)."""
    if min_distance not in (1, 2):
        raise ValueError(f"min_distance must be 1 or 2, found {min_distance!r}")
    rng = random.Random(f"dsmoe-synthetic-identities-{seed}")
    chosen: list[Identity] = []
    # (min_distance 2) A candidate is one attribute away from a chosen key iff they agree once that attribute is
    # blanked: each chosen key is stored blanked in every position, so the check costs one look-up per attribute,
    # not one per identity.
    blanked: set[tuple[str, ...]] = set()
    attempts = 0
    while len(chosen) < count:
        attempts += 1
        if attempts > 200 * count + 10_000:
            raise ValueError(f"cannot draw {count} distinct synthetic identities; ask for fewer")
        candidate = _random_identity(rng, pid=len(chosen) + 1)
        variants = _blanked(candidate.visual_key()) if min_distance == 2 else [candidate.visual_key()]
        if blanked.isdisjoint(variants):
            chosen.append(candidate)
            blanked.update(variants)
    return chosen


def _blanked(key: tuple[str, ...]) -> list[tuple[str, ...]]:
    """``key`` with each attribute in turn replaced by a blank."""
    return [key[:i] + ("\0",) + key[i + 1:] for i in range(len(key))]


# ----------------------------------------------------------------------------------------------- rendering


def _background(rng: random.Random, noise_rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A muted two-tone background (ground and wall) with Gaussian noise."""
    wall = np.array([rng.randint(90, 170) for _ in range(3)], dtype=np.float32)
    ground = wall * rng.uniform(0.6, 0.9)
    horizon = int(height * rng.uniform(0.55, 0.8))
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:horizon] = wall
    canvas[horizon:] = ground
    canvas += noise_rng.normal(0.0, rng.uniform(4.0, 14.0), size=canvas.shape).astype(np.float32)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), mode="RGB")


def _limb(draw: ImageDraw.ImageDraw, top: tuple[float, float], angle: float, length: float, width: float,
          bands: Sequence[tuple[float, tuple[int, int, int]]]) -> None:
    """Draw a straight limb from ``top`` as consecutive coloured bands (fraction of length, colour)."""
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([direction[1], -direction[0]]) * width / 2
    start = 0.0
    origin = np.array(top)
    for end, colour in bands:
        a = origin + direction * length * start
        b = origin + direction * length * end
        corners = [tuple(a + normal), tuple(b + normal), tuple(b - normal), tuple(a - normal)]
        draw.polygon(corners, fill=colour)
        start = end


def render_person(identity: Identity, rng: random.Random, noise_rng: np.random.Generator,
                  size: tuple[int, int]) -> Image.Image:
    """Draw one image (``size`` = (H, W)) of ``identity`` with per-image jitter drawn from the generators."""
    out_h, out_w = size
    height, width = out_h * SUPERSAMPLE, out_w * SUPERSAMPLE
    image = _background(rng, noise_rng, width, height)
    draw = ImageDraw.Draw(image)

    fig_h = height * rng.uniform(0.78, 0.92)
    unit = fig_h / 100.0  # the figure is designed on a 100-unit tall grid
    ux = min(unit, width / 56.0)  # horizontal unit: narrow canvases squeeze the figure sideways
    cx = width / 2 + rng.uniform(-0.08, 0.08) * width
    top = (height - fig_h) / 2 + rng.uniform(-0.04, 0.04) * height

    def y(v: float) -> float:
        return top + v * unit

    skin = SKIN_TONES[identity.skin]
    upper = COLOURS[identity.upper_colour]
    lower = COLOURS[identity.lower_colour]
    torso_w = 26 * ux
    leg_w = 10 * ux
    arm_w = 7 * ux
    leg_spread = rng.uniform(0.0, 0.22) * ux / unit  # limbs are tilted less on narrow canvases
    arm_swing = rng.uniform(0.05, 0.3) * ux / unit

    # Long hair sits behind the head and shoulders.
    if identity.gender == "woman":
        hair = HAIR_COLOURS[identity.head_colour] if identity.headwear == "hair" else HAIR_COLOURS["black"]
        draw.rectangle([cx - 9 * ux, y(6), cx + 9 * ux, y(24)], fill=hair)

    # Backpack behind the torso, sticking out on one side.
    if identity.bag == "backpack":
        draw.rectangle([cx + 6 * ux, y(16), cx + torso_w / 2 + 12 * ux, y(44)], fill=COLOURS[identity.bag_colour])

    # Legs (drawn before the torso so the waist overlaps them).
    hip_y = y(50)
    leg_len = 45 * unit
    for side in (-1, 1):
        hip = (cx + side * 6.5 * ux, hip_y)
        if identity.lower == "trousers":
            bands = [(0.93, lower), (1.0, SHOE_COLOUR)]
        elif identity.lower == "shorts":
            bands = [(0.38, lower), (0.93, skin), (1.0, SHOE_COLOUR)]
        else:  # skirt: the skirt polygon covers the thighs
            bands = [(0.93, skin), (1.0, SHOE_COLOUR)]
        _limb(draw, hip, side * leg_spread, leg_len, leg_w, bands)
    if identity.lower == "skirt":
        flare = 9 * ux + leg_spread * 20 * ux
        draw.polygon(
            [(cx - 13 * ux, y(48)), (cx + 13 * ux, y(48)), (cx + 13 * ux + flare, y(72)),
             (cx - 13 * ux - flare, y(72))],
            fill=lower,
        )

    # Torso.
    draw.rectangle([cx - torso_w / 2, y(15), cx + torso_w / 2, y(52)], fill=upper)
    if identity.bag == "backpack":  # shoulder straps over the chest
        for side in (-1, 1):
            strap_x = cx + side * 7 * ux
            draw.rectangle([strap_x - 1.5 * ux, y(15), strap_x + 1.5 * ux, y(38)],
                           fill=COLOURS[identity.bag_colour])

    # Arms.
    arm_bands = [(0.4, upper), (1.0, skin)] if identity.sleeves == "short" else [(0.88, upper), (1.0, skin)]
    for side in (-1, 1):
        shoulder = (cx + side * (torso_w / 2 + arm_w / 2 - ux), y(17))
        _limb(draw, shoulder, side * arm_swing, 36 * unit, arm_w, arm_bands)

    # Handbag hanging from the right hand.
    if identity.bag == "handbag":
        hand_x = cx + torso_w / 2 + arm_w / 2 + np.sin(arm_swing) * 32 * unit
        hand_y = y(17) + np.cos(arm_swing) * 32 * unit
        draw.line([(hand_x, hand_y), (hand_x, hand_y + 5 * unit)], fill=SHOE_COLOUR, width=max(1, int(unit)))
        draw.rectangle([hand_x - 6 * ux, hand_y + 5 * unit, hand_x + 6 * ux, hand_y + 16 * unit],
                       fill=COLOURS[identity.bag_colour])

    # Head, then hair or hat on top.
    draw.rectangle([cx - 3 * ux, y(11), cx + 3 * ux, y(16)], fill=skin)  # neck
    draw.ellipse([cx - 7 * ux, y(0), cx + 7 * ux, y(14)], fill=skin)
    if identity.headwear == "hair":
        hair_colour = HAIR_COLOURS[identity.head_colour]
        draw.chord([cx - 7.5 * ux, y(-0.5), cx + 7.5 * ux, y(11)], 180, 360, fill=hair_colour)
    else:
        hat = COLOURS[identity.head_colour]
        draw.rectangle([cx - 6.5 * ux, y(-3), cx + 6.5 * ux, y(4)], fill=hat)
        draw.rectangle([cx - 10 * ux, y(3), cx + 10 * ux, y(5.5)], fill=hat)

    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.resize((out_w, out_h), Image.Resampling.BILINEAR)


# -------------------------------------------------------------------------------------------------- captions

_NOUNS = {"man": ("man", "male", "guy", "gentleman", "young man"),
          "woman": ("woman", "female", "lady", "girl", "young woman")}
_PRONOUNS = {"man": "he", "woman": "she"}
_UPPER = {"short": ("t-shirt", "short-sleeved shirt", "short-sleeved top", "tee shirt"),
          "long": ("long-sleeved shirt", "jacket", "sweater", "long-sleeved top")}
_LOWER = {"trousers": ("trousers", "pants", "long pants", "jeans"),
          "shorts": ("shorts", "short pants"),
          "skirt": ("skirt", "short skirt")}
_BAG = {"backpack": ("backpack", "rucksack", "school bag"),
        "handbag": ("handbag", "shoulder bag", "purse")}
_HAT = ("hat", "cap")


def _article(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def _plural(garment: str) -> bool:
    return garment.endswith(("s", "pants"))


def _with_article(phrase: str, garment: str) -> str:
    return phrase if _plural(garment) else _article(phrase)


def describe_person(identity: Identity, rng: random.Random) -> str:
    """One caption that names every attribute of ``identity``, with a random template and synonyms."""
    noun = rng.choice(_NOUNS[identity.gender])
    pronoun = _PRONOUNS[identity.gender]
    upper_g = rng.choice(_UPPER[identity.sleeves])
    lower_g = rng.choice(_LOWER[identity.lower])
    upper = _with_article(f"{identity.upper_colour} {upper_g}", upper_g)
    lower = _with_article(f"{identity.lower_colour} {lower_g}", lower_g)
    hair_len = "long" if identity.gender == "woman" else "short"
    if identity.headwear == "hat":
        head = rng.choice([f"wears {_article(identity.head_colour + ' ' + rng.choice(_HAT))}",
                           f"has {_article(identity.head_colour + ' ' + rng.choice(_HAT))} on the head"])
    else:
        head = rng.choice([f"has {hair_len} {identity.head_colour} hair",
                           f"has {identity.head_colour} hair that is {hair_len}"])
    if identity.bag == "none":
        bag = rng.choice(["", "is not carrying a bag", "carries nothing"])
    else:
        bag_word = rng.choice(_BAG[identity.bag])
        bag_phrase = _article(f"{identity.bag_colour} {bag_word}")
        if identity.bag == "backpack":
            bag = rng.choice([f"carries {bag_phrase}", f"has {bag_phrase} on the back", f"is wearing {bag_phrase}"])
        else:
            bag = rng.choice([f"carries {bag_phrase}", f"is holding {bag_phrase}", f"has {bag_phrase} in hand"])

    clothes = [upper, lower] if rng.random() < 0.5 else [lower, upper]
    opener = rng.choice([
        f"{_article(noun)} wearing {clothes[0]} and {clothes[1]}",
        f"{_article(noun)} in {clothes[0]} and {clothes[1]}",
        f"the {noun} is dressed in {clothes[0]} and {clothes[1]}",
        f"this {noun} wears {clothes[0]} with {clothes[1]}",
        f"the person wears {clothes[0]} and {clothes[1]}",
    ])
    extras = [head] + ([bag] if bag else [])
    rng.shuffle(extras)
    sentences = [opener] + [f"{pronoun} {e}" for e in extras]
    if rng.random() < 0.5 and len(sentences) > 1:
        # Merge the first extra into the opening sentence.
        sentences = [f"{sentences[0]}, and {sentences[1]}"] + sentences[2:]
    return " ".join(s[0].upper() + s[1:] + "." for s in sentences)


def _distinct_captions(identity: Identity, count: int, rng: random.Random) -> list[str]:
    """``count`` captions of one identity, pairwise different where the template space allows."""
    captions: list[str] = []
    seen: set[str] = set()
    for _ in range(count):
        caption = describe_person(identity, rng)
        for _ in range(50):
            if caption not in seen:
                break
            caption = describe_person(identity, rng)
        seen.add(caption)
        captions.append(caption)
    return captions


def _tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", caption.lower())


# -------------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Item:
    split: str
    pid: int
    source: str
    captions: list[str]


def _encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling=2)
    return buffer.getvalue()


def _render_to(root: Path, source: str, identity: Identity, seed: int, index: int,
               size: tuple[int, int]) -> None:
    rng = random.Random(f"dsmoe-synthetic-image-{seed}-{identity.pid}-{index}")
    noise_rng = np.random.default_rng([seed, identity.pid, index])
    path = root / "imgs" / source
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, _encode_jpeg(render_person(identity, rng, noise_rng, size)))


def _split_counts(num_ids: Mapping[str, int] | None, default: Mapping[str, int],
                  allowed: Sequence[str]) -> dict[str, int]:
    counts = dict(default if num_ids is None else num_ids)
    unknown = set(counts) - set(allowed)
    if unknown:
        raise ValueError(f"num_ids has unknown split(s) {sorted(unknown)}; allowed: {list(allowed)}")
    for split, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"num_ids[{split!r}] must be a non-negative integer, found {n!r}")
    if sum(counts.values()) == 0:
        raise ValueError("num_ids asks for no identities at all")
    return {split: counts[split] for split in allowed if counts.get(split, 0) > 0}


def _generate(root: Path, *, layout: str, num_ids: dict[str, int], images_per_id: int, captions_per_image: int,
              image_size: tuple[int, int], seed: int, faults: bool, source_pattern: str,
              progress: bool, min_distance: int = 2) -> list[_Item]:
    """Render all images and return the annotation items in order (faults included)."""
    if images_per_id < 1 or captions_per_image < 1:
        raise ValueError("images_per_id and captions_per_image must be at least 1")
    if len(image_size) != 2 or min(image_size) < 16:
        raise ValueError(f"image_size must be (H, W) with both at least 16, found {image_size!r}")
    identities = make_identities(sum(num_ids.values()), seed, min_distance)
    by_split: dict[str, list[_Item]] = {}
    first = 0
    phase = Phase(f"generating a synthetic {layout} dataset in {root}", sum(num_ids.values()) * images_per_id,
                  "images", enabled=progress)
    for split, count in num_ids.items():
        items: list[_Item] = []
        for identity in identities[first:first + count]:
            caption_rng = random.Random(f"dsmoe-synthetic-captions-{seed}-{identity.pid}")
            pool = _distinct_captions(identity, images_per_id * captions_per_image, caption_rng)
            for k in range(images_per_id):
                source = source_pattern.format(pid=identity.pid, index=k + 1)
                _render_to(root, source, identity, seed, k + 1, image_size)
                phase.advance()
                captions = pool[k * captions_per_image:(k + 1) * captions_per_image]
                items.append(_Item(split, identity.pid, source, captions))
        by_split[split] = items
        first += count
    phase.close()
    if faults:
        _inject_faults(root, by_split, identities, seed, image_size, source_pattern, layout)
    return [item for split in num_ids for item in by_split[split]]


def _inject_faults(root: Path, by_split: dict[str, list[_Item]], identities: list[Identity], seed: int,
                   image_size: tuple[int, int], source_pattern: str, layout: str) -> None:
    """Add one missing-image record, one empty-caption record and one duplicate record."""
    splits = list(by_split)
    first, last = by_split[splits[0]], by_split[splits[-1]]
    # A record whose image file does not exist, placed after the first identity's images.
    ref = first[0]
    missing_source = source_pattern.format(pid=ref.pid, index=99)
    per_id = sum(1 for item in first if item.pid == ref.pid)
    first.insert(per_id, _Item(ref.split, ref.pid, missing_source, list(ref.captions)))
    # A duplicate of the first record at the end of the first split.
    first.append(_Item(ref.split, ref.pid, ref.source, list(ref.captions)))
    # An existing image whose only caption is empty, at the end of the last split.
    owner = last[-1]
    identity = identities[owner.pid - 1]
    assert identity.pid == owner.pid
    empty_source = source_pattern.format(pid=owner.pid, index=98)
    _render_to(root, empty_source, identity, seed, 98, image_size)
    empty = [""] if layout != "rstpreid" else ["", " "]
    last.append(_Item(owner.split, owner.pid, empty_source, empty))


def _to_json(items: list[_Item], layout: str) -> list[dict[str, Any]]:
    if layout == "rstpreid":
        return [{"id": it.pid, "img_path": it.source, "captions": it.captions, "split": it.split} for it in items]
    return [
        {
            "split": it.split,
            "captions": it.captions,
            "file_path": it.source,
            "processed_tokens": _tokens(it.captions[0]) if it.captions else [],
            "id": it.pid,
        }
        for it in items
    ]


def _cached_or_build(root: Path, annotation: str, stamp: dict[str, Any], build: Any) -> Path:
    """Return ``root`` when a finished run with the same arguments is stamped there; else build it."""
    root = Path(root)
    stamp_path = root / STAMP_NAME
    stamp_text = json.dumps(stamp, sort_keys=True)
    if (root / annotation).is_file() and stamp_path.is_file():
        try:
            if stamp_path.read_text(encoding="utf-8") == stamp_text:
                return root
        except OSError:
            pass
    root.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)
    records = build()
    payload = json.dumps(records, indent=1, ensure_ascii=False).encode("utf-8")
    write_atomic(root / annotation, payload)
    write_atomic(stamp_path, stamp_text.encode("utf-8"))
    return root


def _stamp(layout: str, **kwargs: Any) -> dict[str, Any]:
    return {"generator": "dsmoe.demo.people", "version": GENERATOR_VERSION, "layout": layout, **kwargs}


def _write_layout(root: Path, layout: str, annotation: str, source_pattern: str, counts: dict[str, int],
                  images_per_id: int, captions_per_image: int, image_size: tuple[int, int], seed: int,
                  faults: bool, progress: bool, min_distance: int = 2) -> Path:
    """Generate (or reuse, when the stamp matches) one person-retrieval layout under ``root``."""
    size = (int(image_size[0]), int(image_size[1]))
    stamp = _stamp(layout, num_ids=counts, images_per_id=images_per_id, captions_per_image=captions_per_image,
                   image_size=list(size), seed=seed, faults=faults,
                   **({"min_distance": min_distance} if min_distance != 2 else {}))

    def build() -> list[dict[str, Any]]:
        items = _generate(Path(root), layout=layout, num_ids=counts, images_per_id=images_per_id,
                          captions_per_image=captions_per_image, image_size=size, seed=seed, faults=faults,
                          source_pattern=source_pattern, progress=progress, min_distance=min_distance)
        return _to_json(items, layout)

    return _cached_or_build(Path(root), annotation, stamp, build)


def make_synthetic_pedes(
    root: Path,
    *,
    num_ids: dict[str, int] | None = None,
    images_per_id: int = 3,
    captions_per_image: int = 2,
    image_size: tuple[int, int] = (128, 64),
    seed: int = 0,
    faults: bool = False,
    progress: bool = False,
    min_distance: int = 2,
) -> Path:
    """Write a synthetic dataset in the CUHK-PEDES layout (``reid_raw.json`` + ``imgs/synth/*.jpg``).

    ``num_ids`` defaults to ``{"train": 96, "val": 24, "test": 24}``. ``faults=True`` adds one record with a
    missing image, one with an empty caption and one duplicate; ``progress`` reports how far rendering is;
    ``min_distance`` 1 allows CUHK-PEDES's 13,003 people (see ``make_identities``).
    Returns ``root``.
    """
    counts = _split_counts(num_ids, {"train": 96, "val": 24, "test": 24}, SPLITS)
    return _write_layout(root, "cuhk-pedes", "reid_raw.json", "synth/{pid:04d}_{index:02d}.jpg", counts,
                         images_per_id, captions_per_image, image_size, seed, faults, progress, min_distance)


def make_synthetic_icfg(
    root: Path,
    *,
    num_ids: dict[str, int] | None = None,
    images_per_id: int = 3,
    image_size: tuple[int, int] = (128, 64),
    seed: int = 0,
    faults: bool = False,
    progress: bool = False,
    min_distance: int = 2,
) -> Path:
    """Write a synthetic dataset in the ICFG-PEDES layout (``ICFG-PEDES.json``, train/test, one caption each).

    ``num_ids`` defaults to ``{"train": 96, "test": 24}``; ``min_distance`` as for ``make_synthetic_pedes``.
    """
    counts = _split_counts(num_ids, {"train": 96, "test": 24}, ("train", "test"))
    return _write_layout(root, "icfg-pedes", "ICFG-PEDES.json", "synth/{pid:04d}/{pid:04d}_{index:02d}.jpg", counts,
                         images_per_id, 1, image_size, seed, faults, progress, min_distance)


def make_synthetic_rstpreid(
    root: Path,
    *,
    num_ids: dict[str, int] | None = None,
    images_per_id: int = 3,
    captions_per_image: int = 2,
    image_size: tuple[int, int] = (128, 64),
    seed: int = 0,
    faults: bool = False,
    progress: bool = False,
) -> Path:
    """Write a synthetic dataset in the RSTPReid layout (``data_captions.json`` with ``img_path``).

    ``num_ids`` defaults to ``{"train": 96, "val": 24, "test": 24}``; two captions per image by default.
    """
    counts = _split_counts(num_ids, {"train": 96, "val": 24, "test": 24}, SPLITS)
    return _write_layout(root, "rstpreid", "data_captions.json", "{pid:04d}_c{index:d}.jpg", counts, images_per_id,
                         captions_per_image, image_size, seed, faults, progress)
