"""Tests for ddpm_cifar.ema against the closed form of a geometric average."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ddpm_cifar.ema import EMA


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("counter", torch.zeros(2))


def _value(step: int) -> float:
    """The constant every weight is set to at ``step`` (step 0: the weights EMA starts from)."""
    return float(np.sin(step) * 3 + step)


def _set(model: _Net, step: int) -> None:
    """Weight entries get _value(step) times a fixed per-entry factor; the buffer records the step."""
    with torch.no_grad():
        for k, p in enumerate(model.parameters()):
            factor = torch.arange(1, p.numel() + 1, dtype=torch.float32).reshape(p.shape) * (k + 1)
            p.copy_(factor * _value(step))
        model.counter.fill_(step)


def _factors(model: _Net) -> list[np.ndarray]:
    return [np.arange(1, p.numel() + 1, dtype=np.float64).reshape(p.shape) * (k + 1)
            for k, p in enumerate(model.parameters())]


def _ema_scalar(ema: EMA, model: _Net) -> np.ndarray:
    """The EMA weights divided by the per-entry factors: one scalar per entry, all equal."""
    out = [p.detach().double().numpy() / f for p, f in zip(ema.model.parameters(), _factors(model))]
    return np.concatenate([o.ravel() for o in out])


def _closed_form(decay: float, step: int, anchor: int) -> float:
    """EMA after ``step`` when it last equalled weights _value(anchor) at step ``anchor``:
    d^(step-anchor) c_anchor + sum_{j=anchor+1}^{step} (1-d) d^(step-j) c_j."""
    total = decay ** (step - anchor) * _value(anchor)
    for j in range(anchor + 1, step + 1):
        total += (1 - decay) * decay ** (step - j) * _value(j)
    return total


@pytest.mark.parametrize("start_step", [0, 3])
@pytest.mark.parametrize("decay", [0.9, 0.5])
def test_ema_is_the_geometric_average_after_start_step(decay: float, start_step: int) -> None:
    model = _Net()
    _set(model, 0)
    ema = EMA(model, decay=decay, update_every=1, start_step=start_step)
    for step in range(1, 11):
        _set(model, step)
        ema.update(model, step)
        got = _ema_scalar(ema, model)
        if step <= start_step:
            # Before (and at) start_step the EMA is a copy of the weights.
            for e, p in zip(ema.model.parameters(), model.parameters()):
                assert torch.equal(e, p)
        else:
            # Past start_step: anchored at the last copy (or at the initial weights).
            expected = _closed_form(decay, step, anchor=start_step)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
            assert not np.allclose(got, _value(step))  # it really averages
        assert torch.equal(ema.model.counter, model.counter)  # buffers are copied, not averaged


def test_ema_is_independent_of_the_live_model() -> None:
    model = _Net()
    _set(model, 1)
    ema = EMA(model, decay=0.9)
    _set(model, 2)  # changing the live model does not touch the average
    assert np.allclose(_ema_scalar(ema, model), _value(1))
    assert not ema.model.training
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_update_every_3_only_updates_on_multiples_of_3() -> None:
    decay = 0.8
    model = _Net()
    _set(model, 0)
    ema = EMA(model, decay=decay, update_every=3, start_step=0)
    expected = _value(0)
    for step in range(1, 13):
        _set(model, step)
        before = [p.clone() for p in ema.model.parameters()]
        counter_before = ema.model.counter.clone()
        ema.update(model, step)
        if step % 3:
            assert all(torch.equal(b, p) for b, p in zip(before, ema.model.parameters())), step
            assert torch.equal(ema.model.counter, counter_before)
        else:
            expected = decay * expected + (1 - decay) * _value(step)
            assert torch.equal(ema.model.counter, model.counter)
        np.testing.assert_allclose(_ema_scalar(ema, model), expected, rtol=1e-5, atol=1e-5)


def test_update_every_with_start_step_copies_then_averages() -> None:
    decay = 0.7
    model = _Net()
    _set(model, 0)
    ema = EMA(model, decay=decay, update_every=3, start_step=4)
    for step in range(1, 10):
        _set(model, step)
        ema.update(model, step)
    # Step 3 copied (3 <= start_step), steps 6 and 9 averaged; nothing else touched the EMA.
    expected = decay * (decay * _value(3) + (1 - decay) * _value(6)) + (1 - decay) * _value(9)
    np.testing.assert_allclose(_ema_scalar(ema, model), expected, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip() -> None:
    model = _Net()
    _set(model, 5)
    ema = EMA(model, decay=0.9)
    other = _Net()
    _set(other, 0)
    ema2 = EMA(other, decay=0.9)
    ema2.load_state_dict(ema.state_dict())
    for a, b in zip(ema.model.state_dict().values(), ema2.model.state_dict().values()):
        assert torch.equal(a, b)
