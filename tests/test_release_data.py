"""What reaches DM-Adapter's model is the release's: the ids of a padded caption, the corruption of its tokens, the
pixels of a resized and augmented image for the same random draws, and the learning rate of every step. Each
reference below is the release's rule (IRRA's ``datasets/bases.py`` and ``datasets/build.py``, DM-Adapter's
``solver/lr_scheduler.py``) written out with PIL and numpy in place of torchvision."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from dsmoe.data.text import CaptionEncoder
from dsmoe.data.transforms import CLIP_MEAN, CLIP_STD, eval_transform, fitted, normalize, train_transform

SOT, EOT, MASK, VOCAB = 49406, 49407, 49405, 49408  # OpenAI CLIP's ids; IRRA's tokenizer masks with 49405


@pytest.fixture(scope="module")
def clip_sized_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with CLIP's id layout: regular ids 0..49405, start 49406, end 49407 (also its pad
    and unknown token, as transformers' CLIP tokenizer), no mask token."""
    vocab = {f"w{i}": i for i in range(SOT)}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = SOT, EOT
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                       special_tokens=[("<|startoftext|>", SOT), ("<|endoftext|>", EOT)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def release_tokenize(word_ids: list[int], text_length: int) -> torch.Tensor:
    """IRRA's ``tokenize``: start, the caption's ids, end; truncated keeping the end token; zeros after."""
    tokens = [SOT, *word_ids, EOT]
    result = torch.zeros(text_length, dtype=torch.long)
    if len(tokens) > text_length:
        tokens = tokens[:text_length]
        tokens[-1] = EOT
    result[:len(tokens)] = torch.tensor(tokens)
    return result


def release_mask(tokens: torch.Tensor, rng: random.Random, ratio: float = 0.15) -> torch.Tensor:
    """IRRA's ``_build_random_masked_tokens_and_labels`` with its ``random`` calls drawn from ``rng``."""
    tokens = tokens.tolist()
    token_range = list(range(1, VOCAB - 3))  # 1 ~ 49404
    labels = []
    for i, token in enumerate(tokens):
        if 0 < token < 49405:
            prob = rng.random()
            if prob < ratio:
                prob /= ratio
                if prob < 0.8:
                    tokens[i] = MASK
                elif prob < 0.9:
                    tokens[i] = rng.choice(token_range)
                labels.append(token)
            else:
                labels.append(0)
        else:
            labels.append(0)
    if all(label == 0 for label in labels):
        labels[1] = tokens[1]
        tokens[1] = MASK
    return torch.tensor(tokens)


def test_a_caption_is_padded_with_zeros_after_its_end_as_the_release_pads_it(clip_sized_tokenizer):
    encoder = CaptionEncoder(clip_sized_tokenizer, 12, pad_id=0)
    words = [[17, 0, 49404, 5], list(range(100, 120)), [3]]
    encoded = encoder.encode([" ".join(f"w{i}" for i in row) for row in words])
    for ids, row in zip(encoded.ids, words):
        assert torch.equal(ids, release_tokenize(row, 12))
    assert encoded.eot.tolist() == [5, 11, 2]  # the end-of-text position is where the feature is read
    own = CaptionEncoder(clip_sized_tokenizer, 12, pad_id=None).encode(["w3"])
    assert own.ids[0, 3:].tolist() == [EOT] * 9 and own.eot.tolist() == [2]  # pad_id null: the tokenizer's pad


@pytest.mark.parametrize("ratio", [0.15, 0.5, 1e-6])
def test_captions_are_corrupted_as_the_release_corrupts_them_for_the_same_draws(clip_sized_tokenizer, ratio):
    encoder = CaptionEncoder(clip_sized_tokenizer, 20, pad_id=0)
    assert encoder.mask_id == MASK and encoder.regular_ids == list(range(1, 49405))
    captions = ["w17 w0 w49404 w5 w9 w12 w400 w3", " ".join(f"w{i}" for i in range(1000, 1030)), "w0 w0", "w7"]
    encoded = encoder.encode(captions)
    nothing_drawn = 0
    for ids, eot in zip(encoded.ids, encoded.eot.tolist()):
        for seed in range(40):
            ours = encoder.corrupt(ids, eot, random.Random(seed), ratio)
            theirs = release_mask(ids, random.Random(seed), ratio)
            assert torch.equal(ours, theirs), (ids.tolist(), seed, ours.tolist(), theirs.tolist())
            nothing_drawn += int((ours != ids).sum() == 1 and int(ours[1]) == MASK)
    assert nothing_drawn > 0  # the case where no token is drawn and position 1 is masked was met


class Draws:
    """A random source that returns scripted values, in the order the augmentation asks for them."""

    def __init__(self, values: list[float]):
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)

    def randint(self, low: int, high: int) -> int:
        value = self.values.pop(0)
        assert low <= value <= high
        return int(value)

    def uniform(self, low: float, high: float) -> float:
        return self.values.pop(0)


def release_augmented(img: Image.Image, size: tuple[int, int], flip: bool, crop: tuple[int, int],
                      box: tuple[int, int, int, int] | None) -> torch.Tensor:
    """IRRA's training transform with its draws given: ``T.Resize((H, W))`` (PIL bilinear), a horizontal flip,
    ``T.Pad(10)`` (zeros), ``T.RandomCrop((H, W))`` at ``crop`` (top, left), ``T.ToTensor()``, ``T.Normalize``
    with CLIP's mean and std, then ``T.RandomErasing(value=mean)`` over ``box`` (top, left, height, width)."""
    height, width = size
    img = img.resize((width, height), Image.BILINEAR)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    padded = np.zeros((height + 20, width + 20, 3), dtype=np.uint8)
    padded[10:10 + height, 10:10 + width] = np.asarray(img)
    top, left = crop
    x = torch.from_numpy(padded[top:top + height, left:left + width].copy()).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    if box is not None:
        i, j, h, w = box
        x[:, i:i + h, j:j + w] = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    return x


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A 97 x 41 picture with detail in every channel (not the model's size: the resize matters)."""
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 97 * 41 * 3).reshape(97, 41, 3)
    return Image.fromarray((base + rng.integers(0, 60, base.shape)).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("flip, crop, erase", [(True, (3, 17), True), (False, (20, 0), True), (True, (10, 10), False)])
def test_an_augmented_image_has_the_releases_pixels_for_the_same_draws(photo, flip, crop, erase):
    size = (64, 32)
    # area 0.1 of 64 x 32 at aspect 1.5: h = round(sqrt(204.8 * 1.5)) = 18, w = round(sqrt(204.8 / 1.5)) = 12
    draws = [0.2 if flip else 0.7, crop[0], crop[1], 0.3 if erase else 0.9]
    if erase:
        draws += [0.1, math.log(1.5), 5, 7]
    image, box = train_transform(photo, size, Draws(draws), erasing_p=0.5)
    assert box == ((5, 7, 18, 12) if erase else (0, 0, 0, 0))
    ours = normalize(image[None], torch.tensor([box]))[0]
    theirs = release_augmented(photo, size, flip, crop, (5, 7, 18, 12) if erase else None)
    assert torch.equal(ours, theirs)


def test_evaluation_images_are_resized_as_the_releases_resize_them(photo):
    """DM-Adapter: ``T.Resize((H, W))``, bilinear; DASD: CLIP's ``Resize(n, BICUBIC)`` + ``CenterCrop(n)``."""
    stretched = eval_transform(photo, (64, 32))
    reference = np.asarray(photo.resize((32, 64), Image.BILINEAR))
    assert torch.equal(stretched, torch.from_numpy(reference.copy()).permute(2, 0, 1))
    square = eval_transform(photo, (24, 24), "center_crop")
    resized = photo.resize((24, int(24 * 97 / 41)), Image.BICUBIC)  # the shorter side (41) to 24
    top = int(round((resized.height - 24) / 2.0))
    reference = np.asarray(resized.crop((0, top, 24, top + 24)))
    assert torch.equal(square, torch.from_numpy(reference.copy()).permute(2, 0, 1))
    wide = Image.new("RGB", (120, 40))
    assert fitted(wide, (24, 24), "center_crop").size == (24, 24)
    assert fitted(wide, (24, 24), "stretch").size == (24, 24)


def release_lr(epoch_index: int, base_lr: float, warmup_epochs: int = 5, total_epochs: int = 60,
               warmup_factor: float = 0.1) -> float:
    """DM-Adapter's ``LRSchedulerWithWarmup`` (linear warm-up, cosine, target 0) at ``last_epoch``."""
    if epoch_index < warmup_epochs:
        alpha = epoch_index / warmup_epochs
        return base_lr * (warmup_factor * (1 - alpha) + alpha)
    ratio = (epoch_index - warmup_epochs) / (total_epochs - warmup_epochs)
    return base_lr * 0.5 * (1 + math.cos(math.pi * ratio))


def test_the_recipes_learning_rate_is_the_releases_at_every_step():
    """The release steps its scheduler once per epoch: every step of epoch e trains at the schedule's value at
    e; its bias group at twice the base rate. The CUHK-PEDES recipe: the first 3 and the turn from warm-up to
    cosine, 4 steps per epoch."""
    from dsmoe.config import DEFAULT_DEMO_CONFIG, load_config
    from dsmoe.optim import lr_schedule

    cfg = load_config(DEFAULT_DEMO_CONFIG.parent / "cuhk_pedes.yaml")
    assert cfg.optim.schedule_per == "epoch"
    steps_per_epoch = 4
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.Adam([{"params": [weights[0]], "lr": cfg.optim.lr},
                                  {"params": [weights[1]], "lr": cfg.optim.lr * cfg.optim.bias_lr_factor}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(cfg.optim, steps_per_epoch, steps_per_epoch * cfg.train.epochs))
    for step in range(steps_per_epoch * 7):
        epoch = step // steps_per_epoch
        base, bias = scheduler.get_last_lr()
        assert base == pytest.approx(release_lr(epoch, 3e-4), rel=1e-12), (step, base)
        assert bias == pytest.approx(release_lr(epoch, 6e-4), rel=1e-12)
        optimizer.step()
        scheduler.step()
    assert release_lr(0, 3e-4) == pytest.approx(3e-5)  # the first epoch at a tenth of the base rate
