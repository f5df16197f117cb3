"""Assets of the embedded demo: a synthetic CUHK-PEDES-layout dataset, its shards, and a tiny CLIP.

No weights or datasets can be downloaded where the demo must run, so the demo builds everything from
configs: the dataset in the real raw layout (``reid_raw.json`` + ``imgs/``), converted by
``tools/make_shards.py``; a word-level tokenizer trained on the training captions with ``tokenizers``;
and a small ``CLIPModel`` built from a ``CLIPConfig``, briefly pre-trained contrastively on generic
"web" pairs (other people, captions naming only the top's colour) and saved with ``save_pretrained``.
Like OpenAI's CLIP on CUHK-PEDES, that backbone knows something but not the retrieval task: its zero-shot
score is low and the adapters have to learn the rest (trousers, bags, hats). Each step is cached.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import random

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, BertTokenizerFast, CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from dsmoe.config import REPO_ROOT, ModelConfig, RunConfig
from dsmoe.data.synthetic import Identity, describe_person, make_identities, make_synthetic_pedes, render_person
from dsmoe.data.transforms import eval_transform
from dsmoe.losses import symmetric_info_nce

# eos must not get id 2: transformers' CLIPTextModel treats eos_token_id == 2 as a legacy config and pools at
# the largest token id instead of the end-of-text token.
SPECIAL = {"pad": "<|pad|>", "unk": "<|unk|>", "mask": "<|mask|>", "bos": "<|startoftext|>", "eos": "<|endoftext|>"}


def train_tokenizer(captions: list[str], out_dir: Path) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer with CLIP-style start/end tokens."""
    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=list(SPECIAL.values())))
    bos, eos = SPECIAL["bos"], SPECIAL["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in SPECIAL.items()})
    fast.save_pretrained(out_dir)
    return fast


def web_caption(person: Identity, rng: random.Random) -> str:
    """A generic caption of the pre-training pairs: it names the clothes' colours, not bags or hats."""
    template = rng.choice(["a photo of a person in {} and {}", "someone wearing {} with {}",
                           "a picture of {} over {}"])
    return template.format(f"{person.upper_colour} top", f"{person.lower_colour} {person.lower}")


def pretrain_clip(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, steps: int = 300, batch: int = 64,
                  seed: int = 0) -> None:
    """Contrastive pre-training at the square native resolution on generic pairs of unrelated identities."""
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    people = make_identities(200, seed=1000 + seed)  # not the demo's identities
    size = model.config.vision_config.image_size
    images, shown = [], []
    for person in people:
        for _ in range(4):
            images.append(eval_transform(render_person(person, rng, noise, (64, 32)), (size, size)))
            shown.append(person)
    images = torch.stack(images)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        pick = rng.sample(range(len(images)), batch)
        text = tokenizer([web_caption(shown[i], rng) for i in pick], padding=True, return_tensors="pt")
        pixels = images[pick]
        pixels = torch.where(torch.rand(batch, 1, 1, 1) < 0.5, pixels.flip(-1), pixels)
        loss = symmetric_info_nce(model.get_image_features(pixel_values=pixels).pooler_output,
                                  model.get_text_features(**text).pooler_output, logit_scale=50.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def build_tiny_clip(out_dir: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> None:
    """A small CLIP with a square 32x32 pre-training grid (the demo's 64x32 input exercises resizing)."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=64)
    model = CLIPModel(config)
    pretrain_clip(model, tokenizer, seed=seed)
    model.save_pretrained(out_dir)


def prepare_demo_once(cfg: RunConfig) -> None:
    """``prepare_demo`` by the first process of a launch that gets here; the others wait for it (a file lock, so
    no collective has to wait minutes), then find the assets ready."""
    demo_dir = Path(cfg.demo_dir)
    demo_dir.mkdir(parents=True, exist_ok=True)
    with open(demo_dir / ".prepare.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[dsmoe] waiting for another process to prepare the demo assets in {demo_dir}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        prepare_demo(cfg)


def prepare_demo(cfg: RunConfig) -> None:
    """Create (once) the assets of the demo recipe ``cfg`` under ``cfg.demo_dir``."""
    if cfg.method == "dasd":
        prepare_dasd_demo(cfg)
    else:
        prepare_person_demo(cfg.demo_dir, cfg.model)


def _make_shards(*args: str) -> None:
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_shards.py"), *args], check=True)


def _ensure_tiny_clip(clip_dir: Path, english_captions: list[str]) -> None:
    if not (clip_dir / "config.json").is_file():
        rng = random.Random(0)
        corpus = english_captions + [web_caption(person, rng) for person in make_identities(200, seed=1000)]
        build_tiny_clip(clip_dir, train_tokenizer(corpus, clip_dir))


def prepare_person_demo(demo_dir: str | Path, model: ModelConfig) -> None:
    """The DM-Adapter demo: synthetic CUHK-PEDES layout, its shards, the tiny CLIP."""
    demo_dir = Path(demo_dir)
    raw = make_synthetic_pedes(demo_dir / "raw")
    shards = demo_dir / "shards"
    if not (shards / "test.manifest.json").is_file():
        _make_shards("--dataset", "cuhk-pedes", "--root", str(raw), "--out", str(shards), "--samples-per-shard", "64",
                     "--resize", f"{model.image_size[0]}x{model.image_size[1]}")
    records = json.loads((Path(raw) / "reid_raw.json").read_text())
    _ensure_tiny_clip(Path(model.clip), [c for r in records if r["split"] == "train" for c in r["captions"]])


# ---------------------------------------------------------------------------------------------------------------
# DASD demo: a Multi30K-layout dataset with two made-up target languages


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


def build_tiny_mbert(out_dir: Path, captions: list[str]) -> None:
    """A WordPiece tokenizer (BERT's format, like mBERT's) and a tiny BertModel whose word embeddings DASD loads."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(captions, trainers.WordPieceTrainer(
        vocab_size=2000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")
    fast.save_pretrained(out_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(fast), hidden_size=96, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=128)).save_pretrained(out_dir)


def prepare_dasd_demo(cfg: RunConfig) -> None:
    """The DASD demo: synthetic Multi30K layout (en + xx + yy), its shards, the tiny CLIP and the tiny "mBERT"."""
    demo_dir = Path(cfg.demo_dir)
    raw = make_synthetic_multi30k(demo_dir / "raw")
    shards = demo_dir / "shards"
    if not (shards / "test.manifest.json").is_file():
        _make_shards("--dataset", "multi30k", "--root", str(raw), "--out", str(shards), "--task", "1",
                     "--languages", ",".join(["en", *DEMO_LANGUAGES]), "--samples-per-shard", "64",
                     "--resize", f"{cfg.model.image_size[0]}x{cfg.model.image_size[1]}")
    task = raw / "data" / "task1" / "raw"
    english = (task / "train.en").read_text().splitlines()
    _ensure_tiny_clip(Path(cfg.model.clip), english)
    mbert = Path(cfg.dasd.tokenizer)
    if not (mbert / "config.json").is_file():
        build_tiny_mbert(mbert, [line for lang in DEMO_LANGUAGES for line in (task / f"train.{lang}").read_text()
                                 .splitlines()])
