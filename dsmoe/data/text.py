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

    Positions after the end-of-text token hold ``pad_id`` (the releases pad CLIP's ids with 0, IRRA's
    ``tokenize``), or the tokenizer's own pad token when ``pad_id`` is None. The end-of-text position, which the
    feature is read at, is the first end-of-text token either way.

    A tokenizer without a mask token (OpenAI CLIP's) masks with the last regular id below its special ones, as
    IRRA's tokenizer does (id 49405 for CLIP).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, length: int, pad_id: int | None = None):
        # CLIP's tokenizer ends a caption with eos; BERT's (DASD's mBERT) with [SEP].
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if end is None:
            raise ValueError("the tokenizer has no end-of-text (eos or sep) token, which the feature readout needs")
        self.tokenizer = tokenizer
        self.length = length
        self.eos_id = end
        self.pad_id = pad_id
        special = sorted(set(tokenizer.all_special_ids))
        self.mask_id = tokenizer.mask_token_id
        if self.mask_id is None:
            self.mask_id = min(special) - 1
            if self.mask_id <= 0:
                raise ValueError("the tokenizer has no mask token and no regular id below its special tokens")
        self.excluded = frozenset(special) | {self.mask_id}
        # regular ids a corrupted token may become: 1 .. 49404 for CLIP, as IRRA's (id 0 is never drawn)
        self.regular_ids = [i for i in range(1, len(tokenizer)) if i not in self.excluded]

    def encode(self, captions: list[str]) -> EncodedCaptions:
        ids = self.tokenizer(captions, max_length=self.length, truncation=True, padding="max_length",
                             return_tensors="pt")["input_ids"]
        is_eos = ids == self.eos_id
        if not bool(is_eos.any(dim=1).all()):
            raise ValueError("a caption lost its end-of-text token; does the tokenizer add special tokens?")
        eot = is_eos.int().argmax(dim=1)
        if self.pad_id is not None:
            ids = ids.masked_fill(torch.arange(ids.shape[1]) > eot[:, None], self.pad_id)
        return EncodedCaptions(ids=ids, eot=eot)

    def corrupt(self, ids: torch.Tensor, eot: int, rng: random.Random, ratio: float) -> torch.Tensor:
        """A corrupted copy of one caption's ids, by the release's rule (IRRA's masked-token sampling, whose
        output DM-Adapter feeds to its SDM loss): each regular token (id above 0 and not special) before the
        end-of-text position is drawn with probability ``ratio``; the same draw, scaled by ``ratio``, makes it the
        mask (below 0.8), a random regular id (below 0.9) or leaves it; when no token is drawn, position 1 is
        masked. ``rng`` supplies every draw, in position order."""
        if ratio <= 0:
            return ids.clone()
        tokens = ids.tolist()  # one conversion, not one tensor read per position (this runs for every caption)
        drawn = False
        for position in range(1, int(eot)):
            token = tokens[position]
            if token <= 0 or token in self.excluded:
                continue
            chance = rng.random()
            if chance < ratio:
                drawn = True
                chance /= ratio
                if chance < 0.8:
                    tokens[position] = self.mask_id
                elif chance < 0.9:
                    tokens[position] = rng.choice(self.regular_ids)
        if not drawn:
            tokens[1] = self.mask_id
        return torch.tensor(tokens, dtype=ids.dtype)
