"""Image transforms on PIL + numpy (no torchvision), as the releases run them with torchvision on PIL images.

Two ways to fit an image to the model's (H, W) (``data.image_fit``): ``stretch``, IRRA's and DM-Adapter's
``T.Resize((H, W))``, a bilinear resize to exactly H x W; and ``center_crop``, CLIP's own preprocessing that DASD
uses, a bicubic resize of the shorter side (the side that binds) then the centre H x W.

Training adds IRRA's augmentation (horizontal flip, 10-pixel zero padding and a random crop, random erasing). The
readers' workers decode, resize, flip and crop to ``uint8`` tensors [3, H, W] (4x less to move than floats) and
draw the random-erasing box; ``normalize`` turns a whole batch into CLIP-normalised floats on the device and
erases the boxes there with ``T.RandomErasing(value=mean)``'s fill: the mean itself, in normalised units (the
release erases after ``Normalize``). Given the same random draws, the pixels are the release's.
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


FITS = ("stretch", "center_crop")


def fitted(img: Image.Image, size: tuple[int, int], fit: str = "stretch") -> Image.Image:
    """``img`` at (H, W) = ``size``: ``stretch`` resizes it bilinearly to H x W; ``center_crop`` resizes it
    bicubically so that it covers H x W (the shorter side to its target; for a square target, torchvision's
    ``Resize(n)``) and crops the centre (``CenterCrop``'s rounding)."""
    height, width = size
    if fit == "stretch":
        return img if img.size == (width, height) else img.resize((width, height), Image.BILINEAR)
    if fit != "center_crop":
        raise ValueError(f"image fit {fit!r}: one of {FITS}")
    w, h = img.size
    if w * height <= h * width:  # the width binds
        new = (width, max(height, int(width * h / w)))
    else:
        new = (max(width, int(height * w / h)), height)
    if new != img.size:
        img = img.resize(new, Image.BICUBIC)
    top, left = int(round((new[1] - height) / 2.0)), int(round((new[0] - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def eval_transform(img: Image.Image, size: tuple[int, int], fit: str = "stretch") -> torch.Tensor:
    """``img`` fitted to (H, W): a uint8 tensor [3, H, W] (``normalize`` makes it the model's input)."""
    return _to_uint8_tensor(np.asarray(fitted(img, size, fit)))


def train_transform(img: Image.Image, size: tuple[int, int], rng: random.Random, *, pad: int = 10,
                    erasing_p: float = 0.5, fit: str = "stretch") -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Fit to (H, W), horizontal flip, pad + random crop to a uint8 tensor [3, H, W], and the random-erasing box
    (top, left, height, width; scale 0.02-0.4) that ``normalize`` erases."""
    height, width = size
    arr = np.asarray(fitted(img, size, fit))  # [H, W, 3], read-only
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
    image's erase box (``boxes`` [B, 4]: top, left, height, width) set to CLIP's mean per channel, in normalised
    units (``T.RandomErasing(value=mean)`` after ``Normalize``, as the release)."""
    x = images.to(device, non_blocking=True).float().div_(255.0)  # in place: one batch-sized allocation
    shape = (3, 1, 1)
    x.sub_(torch.tensor(CLIP_MEAN, device=x.device).view(shape)).div_(torch.tensor(CLIP_STD, device=x.device).view(shape))
    if boxes is not None:
        fill = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(shape)
        for b, (top, left, h, w) in enumerate(boxes.tolist()):
            if h and w:
                x[b, ..., top:top + h, left:left + w] = fill
    return x.to(dtype)
