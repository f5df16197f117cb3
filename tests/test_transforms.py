"""The reader's uint8 images + ``normalize`` on the device give the same training inputs, draw for draw, as
the release's per-image float pipeline (resize, flip, pad-and-crop, normalise, erase with the mean): resume,
reproducibility and fidelity depend on it."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dsmoe.data.transforms import CLIP_MEAN, CLIP_STD, NO_ERASE, eval_transform, normalize, train_transform

SIZE = (24, 12)


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 17, 3), dtype=np.uint8))


def _per_image_reference(img: Image.Image, rng: random.Random, erasing_p: float) -> torch.Tensor:
    """Resize (bilinear), flip, pad-and-crop, normalise in float32 and erase with the mean (IRRA's
    ``RandomErasing(value=mean)`` after ``Normalize``), in that order, with the same draws."""
    height, width = SIZE
    img = img.resize((width, height), Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.pad(np.asarray(img), ((10, 10), (10, 10), (0, 0)))
    top, left = rng.randint(0, 20), rng.randint(0, 20)
    x = torch.from_numpy(arr[top:top + height, left:left + width].copy()).permute(2, 0, 1).float().div_(255.0)
    x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    if rng.random() < erasing_p:
        for _ in range(10):
            area = height * width * rng.uniform(0.02, 0.4)
            aspect = float(np.exp(rng.uniform(np.log(0.3), np.log(3.3))))
            h, w = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
            if 0 < h < height and 0 < w < width:
                t, l = rng.randint(0, height - h), rng.randint(0, width - w)
                x[:, t:t + h, l:l + w] = torch.tensor(CLIP_MEAN).view(3, 1, 1)
                break
    return x


@pytest.mark.parametrize("erasing_p", [0.0, 0.5, 1.0])
def test_batch_normalisation_equals_the_per_image_pipeline_bit_for_bit(erasing_p):
    images, boxes, expected, erased = [], [], [], 0
    for seed in range(24):
        image, box = train_transform(_image(seed), SIZE, random.Random(seed), erasing_p=erasing_p)
        assert image.dtype == torch.uint8 and image.shape == (3, *SIZE)
        images.append(image)
        boxes.append(box)
        erased += box != NO_ERASE
        expected.append(_per_image_reference(_image(seed), random.Random(seed), erasing_p))
    batch = normalize(torch.stack(images), torch.tensor(boxes))
    assert batch.dtype == torch.float32
    assert torch.equal(batch, torch.stack(expected))
    assert (erased == 0) if erasing_p == 0.0 else erased > 0
    # the same random draws: a generator in the same state afterwards as the per-image pipeline leaves it
    a, b = random.Random(7), random.Random(7)
    train_transform(_image(0), SIZE, a, erasing_p=erasing_p)
    _per_image_reference(_image(0), b, erasing_p)
    assert a.random() == b.random()


@pytest.mark.parametrize("size", [(4, 3), (24, 12), (7, 40)])
def test_crops_of_any_size_equal_padding_then_cropping(size):
    for seed in range(40):  # flips, and windows reaching into every side of the padding
        img = _image(seed).resize((size[1], size[0]), Image.BICUBIC)
        a, b = random.Random(seed), random.Random(seed)
        image, _ = train_transform(img, size, a, erasing_p=0.0)
        flipped = img.transpose(Image.FLIP_LEFT_RIGHT) if b.random() < 0.5 else img
        arr = np.pad(np.asarray(flipped), ((10, 10), (10, 10), (0, 0)))
        top, left = b.randint(0, 20), b.randint(0, 20)
        expected = torch.from_numpy(arr[top:top + size[0], left:left + size[1]].copy()).permute(2, 0, 1)
        assert torch.equal(image, expected), (size, seed)


def test_eval_images_and_video_frames_normalise_alike():
    frame = eval_transform(_image(3), SIZE)
    video = torch.stack([frame, frame])[None]  # [B=1, N=2, 3, H, W]
    box = torch.tensor([[2, 3, 5, 4]])
    out = normalize(video, box, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, 3, *SIZE)
    fill = torch.tensor(CLIP_MEAN).view(3, 1, 1).to(torch.bfloat16)
    assert (out[0, :, :, 2:7, 3:7] == fill).all(), "every frame of a video is erased in the same box"
    single = normalize(frame[None])
    assert torch.equal(single[0, :, :2], normalize(video)[0, 0, :, :2])
