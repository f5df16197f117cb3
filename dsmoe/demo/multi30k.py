"""The DASD demo's data: a Multi30K task-1 layout whose two made-up target languages are systematic rewrites of the
English captions ("xx": every word reversed with the suffix -o; "yy": pseudo-words in reverse word order)."""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np

from dsmoe.demo.people import describe_person, make_identities, render_person


def rewrite_xx(caption: str) -> str:
    """Made-up language "xx": every word reversed with the suffix -o, punctuation dropped."""
    return " ".join(word[::-1] + "o" for word in re.findall(r"[a-z\-]+", caption.lower()))


def rewrite_yy(caption: str) -> str:
    """Made-up language "yy": each word replaced by a fixed pseudo-word, in reverse word order."""
    words = re.findall(r"[a-z\-]+", caption.lower())
    return " ".join(_pseudo_word(word) for word in reversed(words))


def _pseudo_word(word: str) -> str:
    syllables = ["ka", "lu", "mi", "zo", "te", "ra", "ni", "po", "sa", "qe", "vu", "di"]
    digest = hashlib.sha256(word.encode()).digest()
    return "".join(syllables[b % len(syllables)] for b in digest[:3])


DEMO_LANGUAGES = {"xx": rewrite_xx, "yy": rewrite_yy}
MULTI30K_SPLITS = {"train": 300, "val": 60, "test_2016_flickr": 60}


def make_synthetic_multi30k(root: Path, seed: int = 0, splits: dict[str, int] = MULTI30K_SPLITS) -> Path:
    """Multi30K task-1 layout: ``images/`` (Flickr30K-style names), ``data/task1/image_splits/{split}.txt`` and
    ``data/task1/raw/{split}.{lang}`` (one caption per image and line, aligned across languages)."""
    stamp = root / ".synthetic_done"
    wanted = json.dumps({"seed": seed, "splits": splits})
    if stamp.is_file() and stamp.read_text() == wanted:
        return root
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    people = make_identities(sum(splits.values()), seed=2000 + seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "data" / "task1" / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "data" / "task1" / "raw").mkdir(parents=True, exist_ok=True)
    offset = 0
    for split, count in splits.items():
        names, english = [], []
        for person in people[offset:offset + count]:
            name = f"{1000000000 + person.pid * 7919}.jpg"
            render_person(person, rng, noise, (128, 64)).save(root / "images" / name, quality=90)
            names.append(name)
            english.append(describe_person(person, rng))
        offset += count
        (root / "data" / "task1" / "image_splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
        (root / "data" / "task1" / "raw" / f"{split}.en").write_text("\n".join(english) + "\n")
        for lang, rewrite in DEMO_LANGUAGES.items():
            lines = [rewrite(c) for c in english]
            (root / "data" / "task1" / "raw" / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    stamp.write_text(wanted)
    return root
