"""Exponential moving average of model weights."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """Keeps ``decay``-averaged weights, updated every ``update_every`` optimizer steps.

    Until ``start_step`` the average simply copies the weights, so early random weights do not
    linger in it (as in the study's reference trainer).
    """

    def __init__(self, model: nn.Module, *, decay: float, update_every: int = 1, start_step: int = 0):
        self.decay, self.update_every, self.start_step = decay, update_every, start_step
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after optimizer step number ``step`` (1-based)."""
        if step % self.update_every:
            return
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if step <= self.start_step:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
