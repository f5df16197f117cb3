"""Caption tokenisation to fixed-length ids with the end-of-text position, and caption corruption."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(name_or_path)


@dataclass
class EncodedCaptions:
    ids: torch.Tensor  # [B, L] long
    eot: torch.Tensor  # [B] long: index of the end-of-text token


class CaptionEncoder:
    """Tokenise captions to ``length`` ids (truncated, padded) and locate the end-of-text (or [SEP]) token.

    Corruption replaces tokens strictly between BOS and EOT: 80% become the mask token, 10% a random
    regular token, 10% stay. A tokenizer without a mask token (OpenAI CLIP's) uses the last regular
    token id below the special ones, as IRRA's tokenizer does.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, length: int):
        # CLIP's tokenizer ends a caption with eos; BERT's (DASD's mBERT) with [SEP].
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if end is None:
            raise ValueError("the tokenizer has no end-of-text (eos or sep) token, which the feature readout needs")
        self.tokenizer = tokenizer
        self.length = length
        self.eos_id = end
        special = sorted(set(tokenizer.all_special_ids))
        self.mask_id = tokenizer.mask_token_id
        if self.mask_id is None:
            self.mask_id = min(special) - 1
            if self.mask_id <= 0:
                raise ValueError("the tokenizer has no mask token and no regular id below its special tokens")
        excluded = set(special) | {self.mask_id}
        self.regular_ids = [i for i in range(len(tokenizer)) if i not in excluded]

    def encode(self, captions: list[str]) -> EncodedCaptions:
        ids = self.tokenizer(captions, max_length=self.length, truncation=True, padding="max_length",
                             return_tensors="pt")["input_ids"]
        is_eos = ids == self.eos_id
        if not bool(is_eos.any(dim=1).all()):
            raise ValueError("a caption lost its end-of-text token; does the tokenizer add special tokens?")
        return EncodedCaptions(ids=ids, eot=is_eos.int().argmax(dim=1))

    def corrupt(self, ids: torch.Tensor, eot: int, rng: random.Random, ratio: float) -> torch.Tensor:
        """Corrupted copy of one caption's ids (at least one token selected when any is eligible)."""
        out = ids.clone()
        positions = list(range(1, int(eot)))
        if not positions or ratio <= 0:
            return out
        chosen = [p for p in positions if rng.random() < ratio] or [rng.choice(positions)]
        for p in chosen:
            roll = rng.random()
            if roll < 0.8:
                out[p] = self.mask_id
            elif roll < 0.9:
                out[p] = rng.choice(self.regular_ids)
        return out
