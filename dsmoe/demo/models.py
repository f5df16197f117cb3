"""The demo's tiny models, built from configs: a word-level CLIP tokenizer, a small CLIP briefly pre-trained on
generic pairs of people the demo does not use, and a WordPiece "mBERT" whose word embeddings DASD loads."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, BertTokenizerFast, CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from dsmoe.data.transforms import eval_transform, normalize
from dsmoe.demo.people import Identity, make_identities, render_person
from dsmoe.losses import symmetric_info_nce
from dsmoe.progress import Phase

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
    images = normalize(torch.stack(images))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    model.train()
    phase = Phase("demo: pre-training the tiny CLIP on generic pairs", steps, "steps", every=15.0)
    for _ in range(steps):
        phase.advance()
        pick = rng.sample(range(len(images)), batch)
        text = tokenizer([web_caption(shown[i], rng) for i in pick], padding=True, return_tensors="pt")
        pixels = images[pick]
        pixels = torch.where(torch.rand(batch, 1, 1, 1) < 0.5, pixels.flip(-1), pixels)
        loss = symmetric_info_nce(model.get_image_features(pixel_values=pixels).pooler_output,
                                  model.get_text_features(**text).pooler_output, logit_scale=50.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    phase.close()
    model.eval()


def build_tiny_clip(out_dir: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0, pretrain: bool = True) -> None:
    """A small CLIP with a square 32x32 pre-training grid (the demo's 64x32 input exercises resizing);
    ``pretrain=False`` keeps its random weights (for speed measurements)."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=64)
    model = CLIPModel(config)
    if pretrain:
        pretrain_clip(model, tokenizer, seed=seed)
    model.save_pretrained(out_dir)


def ensure_tiny_clip(clip_dir: Path, english_captions: list[str]) -> None:
    if not (clip_dir / "config.json").is_file():
        rng = random.Random(0)
        corpus = english_captions + [web_caption(person, rng) for person in make_identities(200, seed=1000)]
        build_tiny_clip(clip_dir, train_tokenizer(corpus, clip_dir))


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
