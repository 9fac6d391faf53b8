"""Exponential moving average of model weights, as the study's trainer kept it.

The study used lucidrains' denoising-diffusion-pytorch Trainer, which calls ema-pytorch's
``EMA(model, beta=decay, update_every=...).update()`` once per optimizer step with its defaults
(update_after_step 100, inv_gamma 1, power 2/3, min_value 0). This class follows it update for
update (tests/test_ema.py drives both side by side). With ``n`` optimizer steps before this one
(ema-pytorch's step counter):

- nothing happens unless ``n`` is a multiple of ``update_every``;
- while ``n <= start_step`` the average is a copy of the weights, so the early random weights do
  not linger in it (``n = 0``, the first update, always copies);
- after that it moves towards the weights with decay
  ``min(decay, 1 - (1 + (n - start_step) / inv_gamma) ** -power)``, or ``decay`` when ``power``
  is None (no warm-up). ema-pytorch also clamps from below by min_value; the study's 0 never binds,
  as the warm-up is positive for every ``n > start_step``.

Floating-point buffers are averaged like the weights (ema-pytorch does too); others are copied,
where ema-pytorch leaves them as they were when the EMA was made (this project's networks have none).
The state is the averaged weights alone: the rest is a function of the step, which the training
checkpoint holds.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, *, decay: float, update_every: int = 1, start_step: int = 0,
                 inv_gamma: float = 1.0, power: float | None = None):
        self.decay, self.update_every, self.start_step = decay, update_every, start_step
        self.inv_gamma, self.power = inv_gamma, power
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (0 where it copies)."""
        done = step - 1
        if done <= self.start_step:
            return 0.0
        if self.power is None:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + (done - self.start_step) / self.inv_gamma) ** -self.power)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after optimizer step number ``step`` (1-based), once per optimizer step."""
        if (step - 1) % self.update_every:
            return
        ema_tensors = list(self.model.parameters())
        tensors = [p.detach() for p in model.parameters()]
        for eb, b in zip(self.model.buffers(), model.buffers()):
            if eb.is_floating_point():
                ema_tensors.append(eb)
                tensors.append(b)
            else:
                eb.copy_(b)
        decay = self.decay_at(step)
        if decay == 0.0:
            torch._foreach_copy_(ema_tensors, tensors)
        else:
            torch._foreach_lerp_(ema_tensors, tensors, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
