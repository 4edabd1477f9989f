"""On-device image augmentation for the CNN: random crop with padding, flip, gaussian noise.

Works on the flat ``(n, C*H*W)`` rows the networks take, on whatever device they are on, with
its own generator: the augmentation seed never shifts weight init, dropout or batch order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ImageAugmenter:
    """Augment a batch of flat image rows; ``generator`` holds the (checkpointed) RNG state."""

    def __init__(
        self,
        image_shape: list[int],
        crop_pad: int,
        flip: bool,
        noise: float,
        seed: int,
        device: torch.device,
    ) -> None:
        self.image_shape = tuple(image_shape)
        self.crop_pad, self.flip, self.noise = crop_pad, flip, noise
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = device

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        images = rows.reshape(-1, *self.image_shape)
        if self.crop_pad:
            images = self._random_crop(images)
        if self.flip:
            flip = torch.rand(len(images), generator=self.generator, device=self.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.noise:
            images = images + self.noise * torch.randn(
                images.shape, generator=self.generator, device=self.device, dtype=images.dtype
            )
        return images.reshape(rows.shape)

    def _random_crop(self, images: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = images.shape
        pad = self.crop_pad
        padded = F.pad(images, (pad, pad, pad, pad))
        top, left = torch.randint(
            0, 2 * pad + 1, (2, n), generator=self.generator, device=self.device
        )
        # One gather for the whole batch: per-image row/column indices into the padded map.
        rows = (top[:, None] + torch.arange(height, device=self.device))[:, None, :, None]
        cols = (left[:, None] + torch.arange(width, device=self.device))[:, None, None, :]
        batch = torch.arange(n, device=self.device)[:, None, None, None]
        chan = torch.arange(channels, device=self.device)[None, :, None, None]
        return padded[batch, chan, rows, cols]
