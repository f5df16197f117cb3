"""Image transforms on PIL + numpy (no torchvision): IRRA's person-retrieval augmentation.

The readers' workers decode, resize, flip and crop to ``uint8`` tensors [3, H, W] (4x less to move than floats)
and draw the random-erasing box; ``normalize`` turns a whole batch into CLIP-normalised floats on the device and
erases the boxes there. The arithmetic and the random draws are those of a per-image float pipeline, so the
training batches are the same.
"""
from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NO_ERASE = (0, 0, 0, 0)  # an erase box (top, left, height, width) that erases nothing


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")


def _to_uint8_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(arr, np.uint8, "W")).permute(2, 0, 1).contiguous()  # PIL's arrays are read-only


def eval_transform(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize to (H, W): a uint8 tensor [3, H, W] (``normalize`` makes it the model's input)."""
    height, width = size
    return _to_uint8_tensor(np.asarray(img.resize((width, height), Image.BICUBIC)))


def train_transform(img: Image.Image, size: tuple[int, int], rng: random.Random, *, pad: int = 10,
                    erasing_p: float = 0.5) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Resize, horizontal flip, pad + random crop to a uint8 tensor [3, H, W], and the random-erasing box
    (top, left, height, width; scale 0.02-0.4) that ``normalize`` erases, to CLIP's mean colour."""
    height, width = size
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)
    arr = np.asarray(img)  # [H, W, 3], read-only
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    top, left = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    # the window [top, top + H) x [left, left + W) of the image padded by ``pad`` zeros, copied once, channels first
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    rows = slice(max(top, pad), min(top + height, pad + height))
    cols = slice(max(left, pad), min(left + width, pad + width))
    if rows.start < rows.stop and cols.start < cols.stop:  # else the window holds padding only (tiny images)
        window = arr[rows.start - pad:rows.stop - pad, cols.start - pad:cols.stop - pad]
        image[:, rows.start - top:rows.stop - top, cols.start - left:cols.stop - left] = \
            torch.from_numpy(np.ascontiguousarray(window.transpose(2, 0, 1)))
    box = _erase_box(height, width, rng) if rng.random() < erasing_p else NO_ERASE
    return image, box


def _erase_box(height: int, width: int, rng: random.Random, scale=(0.02, 0.4),
               ratio=(0.3, 3.3)) -> tuple[int, int, int, int]:
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        h, w = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 0 < h < height and 0 < w < width:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return NO_ERASE


def normalize(images: torch.Tensor, boxes: torch.Tensor | None = None, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images [B, 3, H, W] (or videos [B, N, 3, H, W]) -> CLIP-normalised ``dtype`` on ``device``, each
    image's erase box (``boxes`` [B, 4]: top, left, height, width) set to 0, CLIP's mean colour."""
    x = images.to(device, non_blocking=True).float().div_(255.0)  # in place: one batch-sized allocation
    shape = (3, 1, 1)
    x.sub_(torch.tensor(CLIP_MEAN, device=x.device).view(shape)).div_(torch.tensor(CLIP_STD, device=x.device).view(shape))
    if boxes is not None:
        for b, (top, left, h, w) in enumerate(boxes.tolist()):
            if h and w:
                x[b, ..., top:top + h, left:left + w] = 0.0
    return x.to(dtype)
