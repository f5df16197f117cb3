"""Image transforms on PIL + numpy (no torchvision): IRRA's person-retrieval augmentation."""
from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def _to_normalised_tensor(arr: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    return (tensor - CLIP_MEAN) / CLIP_STD


def eval_transform(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize to (H, W) and normalise with CLIP's mean and std."""
    height, width = size
    return _to_normalised_tensor(np.asarray(img.resize((width, height), Image.BICUBIC)))


def train_transform(img: Image.Image, size: tuple[int, int], rng: random.Random, *, pad: int = 10,
                    erasing_p: float = 0.5) -> torch.Tensor:
    """Resize, horizontal flip, pad + random crop, normalise, random erasing (scale 0.02-0.4).

    Erased pixels are set to 0 after normalisation, i.e. to CLIP's mean colour.
    """
    height, width = size
    img = img.resize((width, height), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.pad(np.asarray(img), ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    tensor = _to_normalised_tensor(arr[top:top + height, left:left + width])
    if rng.random() < erasing_p:
        _erase(tensor, rng)
    return tensor


def _erase(tensor: torch.Tensor, rng: random.Random, scale=(0.02, 0.4), ratio=(0.3, 3.3)) -> None:
    _, height, width = tensor.shape
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        h, w = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 0 < h < height and 0 < w < width:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            tensor[:, top:top + h, left:left + w] = 0.0
            return
