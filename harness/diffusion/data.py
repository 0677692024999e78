"""The concept images and the batches built from them.

* :class:`ConceptDataset`: a folder of 3-20 concept images with optional ``<name>.txt`` captions (or the Mix-of-Show
  layout ``image/`` + ``caption/``), random crop / flip / :func:`color_jitter`, a clear error for a missing or empty
  folder;
* :func:`tokenize` (prompts to token ids like Stable Diffusion's pipelines) and :func:`make_collate` (the
  DataLoader's ``collate_fn``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "color_jitter", "ConceptDataset", "tokenize", "make_collate"]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness / contrast / saturation jitter of an image ``x`` (3, H, W) in [0, 1].

    Each factor is drawn uniformly from [1 - s, 1 + s] (``s = 0`` leaves that property alone), like
    torchvision's ``ColorJitter`` without the hue term.
    """
    def factor(strength: float) -> float:
        return 1.0 + (2 * torch.rand((), generator=generator).item() - 1) * strength

    def gray(image: torch.Tensor) -> torch.Tensor:
        return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).unsqueeze(0)

    x = (x * factor(brightness)).clamp(0, 1)
    x = ((x - gray(x).mean()) * factor(contrast) + gray(x).mean()).clamp(0, 1)
    return ((x - gray(x)) * factor(saturation) + gray(x)).clamp(0, 1)


def _concept_files(folder: Path) -> list[tuple[Path, Path | None]]:
    """(image, caption or None) pairs of a concept folder: ``<folder>/*.jpg`` with ``<stem>.txt`` beside them,
    or the Mix-of-Show layout ``<folder>/image/*`` with ``<folder>/caption/<stem>.txt``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"concept folder {str(folder)!r} does not exist (set concept.dir= or data.root=)")
    image_dir, caption_dir = (folder / "image", folder / "caption") if (folder / "image").is_dir() else (folder, folder)
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"concept folder {str(image_dir)!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return [(p, (caption_dir / f"{p.stem}.txt") if (caption_dir / f"{p.stem}.txt").is_file() else None)
            for p in images]


class ConceptDataset(torch.utils.data.Dataset):
    """The few images of one concept, each with its prompt, as ``{"pixel_values": (3, R, R) in [-1, 1], "prompt"}``.

    Args:
        folder: images (``.jpg``/``.png``/...) with optional captions ``<stem>.txt`` beside them (or the
            Mix-of-Show layout ``image/`` + ``caption/``).
        resolution: side of the square training crop.
        prompt: one prompt for every image (DreamBooth style, e.g. ``"a photo of <s1><s2>"``); when ``None`` the
            captions are used, with ``placeholder`` (``"<TOK>"`` in the shared captions) replaced by ``replacement``.
        random_crop, hflip: augmentations (a centre crop without ``random_crop``).
        jitter: (brightness, contrast, saturation) strengths for :func:`color_jitter`, or ``None``.
        repeats: the dataset length is ``repeats x number of images`` (one epoch = that many samples).
    """

    def __init__(self, folder: str | Path, resolution: int, prompt: str | None = None, placeholder: str = "<TOK>",
                 replacement: str = "", random_crop: bool = True, hflip: bool = True,
                 jitter: Sequence[float] | None = None, repeats: int = 1):
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.folder, self.resolution, self.repeats = Path(folder), int(resolution), int(repeats)
        self.random_crop, self.hflip, self.jitter = random_crop, hflip, (tuple(jitter) if jitter else None)
        self.images, self.prompts = [], []
        for image_path, caption_path in _concept_files(self.folder):
            if prompt is None and caption_path is None:
                raise ValueError(f"image {str(image_path)!r} has no caption file {image_path.stem}.txt; "
                                 "give a caption per image or a fixed prompt")
            text = prompt if prompt is not None else caption_path.read_text(encoding="utf-8").strip()
            self.prompts.append(text.replace(placeholder, replacement) if prompt is None else text)
            image = Image.open(image_path).convert("RGB")
            scale = self.resolution / min(image.size)
            size = tuple(max(self.resolution, round(side * scale)) for side in image.size)
            pixels = torch.from_numpy(np.asarray(image.resize(size, Image.BICUBIC)).copy())
            self.images.append(pixels.permute(2, 0, 1).float() / 255.0)

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, index: int) -> dict:
        image, prompt = self.images[index % len(self.images)], self.prompts[index % len(self.images)]
        _, h, w = image.shape
        r = self.resolution
        top, left = ((random.randint(0, h - r), random.randint(0, w - r)) if self.random_crop
                     else ((h - r) // 2, (w - r) // 2))
        x = image[:, top:top + r, left:left + r]
        if self.hflip and random.random() < 0.5:
            x = x.flip(-1)
        if self.jitter:
            x = color_jitter(x, *self.jitter)
        return {"pixel_values": x * 2 - 1, "prompt": prompt}


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(N, model_max_length) token ids, padded and truncated like Stable Diffusion's pipelines."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def make_collate(tokenize_prompts: Callable[[list[str]], torch.Tensor]) -> Callable[[list[dict]], dict]:
    """DataLoader ``collate_fn`` turning :class:`ConceptDataset` items into ``{"pixel_values", "input_ids"}``."""
    def collate(items: list[dict]) -> dict:
        return {"pixel_values": torch.stack([i["pixel_values"] for i in items]),
                "input_ids": tokenize_prompts([i["prompt"] for i in items])}
    return collate
