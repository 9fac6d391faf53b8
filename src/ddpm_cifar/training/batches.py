"""Training batches: deterministic and augmented, rebuilt from (seed, position) alone, so that a
resumed run draws exactly what an uninterrupted one would."""

from __future__ import annotations

import numpy as np
import torch


class BatchSource:
    """Deterministic, augmenting batches from a uint8 (N, H, W, C) array.

    Image position p (counting from the start of training) maps to epoch p // N and to the
    (p % N)-th entry of that epoch's permutation, seeded by (seed, epoch): the batch at any step
    can be rebuilt after a restart without replaying the ones before it.
    """

    def __init__(self, images: np.ndarray, seed: int, device: torch.device):
        # (N, H, W, C) uint8 -> (N, C, H, W) uint8 on the device: CIFAR-10 is 150 MB, so the whole
        # set lives on the device and batching is an index, with no loader processes.
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)
        self.n, self.seed = len(images), seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def batch(self, start: int, size: int, part: slice = slice(None)) -> torch.Tensor:
        """Images at positions [start, start + size), randomly h-flipped, float in [-1, 1].

        ``part`` selects a rank's share of that batch; the images and flips are those of the whole
        batch, so a share does not depend on how the batch is split.
        """
        pos = torch.arange(start, start + size)
        epochs = pos // self.n
        idx = torch.empty(size, dtype=torch.long)
        for epoch in epochs.unique().tolist():  # one or two epochs per batch
            mask = epochs == epoch
            idx[mask] = self._permutation(epoch)[pos[mask] % self.n]
        # The flip decision is seeded by position too, for the same reason.
        g = torch.Generator().manual_seed(self.seed * 7_919 + start)
        flip = torch.rand(size, generator=g) < 0.5
        idx, flip = idx[part], flip[part].to(self.images.device)
        x = self.images[idx.to(self.images.device)].float() / 127.5 - 1  # (b, C, H, W)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)
