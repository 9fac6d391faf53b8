"""Tests for ddpm_cifar.training.ema: the closed form of a geometric average, and ema-pytorch step by step."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import require
from torch import nn

from ddpm_cifar.training.ema import EMA


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


def _closed_form(decay: float, step: int, anchor: int, value: Callable[[int], float] = _value) -> float:
    """EMA after ``step`` when it last equalled weights value(anchor) at step ``anchor``:
    d^(step-anchor) c_anchor + sum_{j=anchor+1}^{step} (1-d) d^(step-j) c_j."""
    total = decay ** (step - anchor) * value(anchor)
    for j in range(anchor + 1, step + 1):
        total += (1 - decay) * decay ** (step - j) * value(j)
    return total


@pytest.mark.parametrize("start_step", [0, 3])
@pytest.mark.parametrize("decay", [0.9, 0.5])
def test_ema_is_the_geometric_average_after_start_step(decay: float, start_step: int) -> None:
    model = _Net()
    _set(model, 0)
    ema = EMA(model, decay=decay, update_every=1, start_step=start_step, power=None)
    for step in range(1, 11):
        _set(model, step)
        ema.update(model, step)
        got = _ema_scalar(ema, model)
        if step - 1 <= start_step:
            # While at most start_step steps came before, the EMA is a copy of the weights.
            for e, p in zip(ema.model.parameters(), model.parameters()):
                assert torch.equal(e, p)
            assert torch.equal(ema.model.counter, model.counter)
        else:
            # After: anchored at the last copy, at step start_step + 1.
            expected = _closed_form(decay, step, anchor=start_step + 1)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
            assert not np.allclose(got, _value(step))  # it really averages
            # Floating-point buffers are averaged like the weights (as ema-pytorch does).
            counter = _closed_form(decay, step, anchor=start_step + 1, value=float)
            np.testing.assert_allclose(ema.model.counter.numpy(), counter, rtol=1e-5)


def test_ema_is_independent_of_the_live_model() -> None:
    model = _Net()
    _set(model, 1)
    ema = EMA(model, decay=0.9)
    _set(model, 2)  # changing the live model does not touch the average
    assert np.allclose(_ema_scalar(ema, model), _value(1))
    assert not ema.model.training
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_update_every_3_updates_after_steps_1_4_7_10() -> None:
    # ema-pytorch updates when the steps done before are a multiple of update_every.
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
        if step not in (1, 4, 7, 10):
            assert all(torch.equal(b, p) for b, p in zip(before, ema.model.parameters())), step
            assert torch.equal(ema.model.counter, counter_before)
        elif step == 1:  # the first update copies (no step came before it)
            expected = _value(1)
            assert torch.equal(ema.model.counter, model.counter)
        else:
            expected = decay * expected + (1 - decay) * _value(step)
        np.testing.assert_allclose(_ema_scalar(ema, model), expected, rtol=1e-5, atol=1e-5)


def test_update_every_with_start_step_copies_then_averages() -> None:
    decay = 0.7
    model = _Net()
    _set(model, 0)
    ema = EMA(model, decay=decay, update_every=3, start_step=4)
    for step in range(1, 11):
        _set(model, step)
        ema.update(model, step)
    # Steps 1 and 4 copied (0 and 3 steps before them <= start_step), steps 7 and 10 averaged;
    # nothing else touched the EMA.
    expected = decay * (decay * _value(4) + (1 - decay) * _value(7)) + (1 - decay) * _value(10)
    np.testing.assert_allclose(_ema_scalar(ema, model), expected, rtol=1e-5, atol=1e-5)


def test_warm_up_decay() -> None:
    ema = EMA(_Net(), decay=0.995, update_every=10, start_step=100, inv_gamma=1.0, power=2 / 3)
    assert ema.decay_at(101) == 0.0  # 100 steps before: still a copy
    assert ema.decay_at(111) == pytest.approx(1 - 11 ** (-2 / 3))  # the first average, 10 steps past
    ema = EMA(_Net(), decay=0.995, update_every=10, start_step=100, inv_gamma=2.0, power=0.75)
    assert ema.decay_at(111) == pytest.approx(1 - 6 ** -0.75)
    # The study's params: the update after step 2,931 is the first at the full 0.995.
    ema = EMA(_Net(), decay=0.995, update_every=10, start_step=100, inv_gamma=1.0, power=2 / 3)
    updates = range(1, 5000, 10)
    first = next(s for s in updates if ema.decay_at(s) == 0.995)
    assert first == 2931
    climb = [s for s in updates if 101 <= s <= first]  # from the last copy to the cap
    assert all(ema.decay_at(a) < ema.decay_at(b) for a, b in zip(climb, climb[1:]))
    assert EMA(_Net(), decay=0.995, start_step=100, power=None).decay_at(102) == 0.995


@pytest.mark.parametrize("power", [2 / 3, 0.75, None], ids=["study-warm-up", "power-0.75", "constant"])
@pytest.mark.parametrize("update_every", [1, 10])
def test_matches_ema_pytorch_at_every_step(update_every: int, power: float | None) -> None:
    """The study's EMA, update for update: ema-pytorch's EMA.update() once per optimizer step, as
    denoising-diffusion-pytorch's Trainer calls it, against ours after each step."""
    ema_pytorch = require("ema_pytorch")
    decay, start, steps = 0.9, 5, 150
    torch.manual_seed(0)
    model = _Net()
    ours = EMA(model, decay=decay, update_every=update_every, start_step=start, inv_gamma=1.0, power=power)
    # ema-pytorch has no switch for a constant decay: a floor (min_value) at beta gives one.
    theirs = ema_pytorch.EMA(model, beta=decay, update_every=update_every, update_after_step=start,
                             inv_gamma=1.0, power=power or 2 / 3, min_value=decay if power is None else 0.0)
    g = torch.Generator().manual_seed(1)
    decays = []
    for step in range(1, steps + 1):
        with torch.no_grad():  # the weights after this optimizer step
            for t in [*model.parameters(), *model.buffers()]:
                t.copy_(torch.randn(t.shape, generator=g))
        ours.update(model, step)
        theirs.update()
        reference = theirs.ema_model.state_dict()
        for name, value in ours.model.state_dict().items():
            torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6, msg=f"{name}, step {step}")
        if (step - 1) % update_every == 0:
            decays.append(ours.decay_at(step))
    # The run covered the copies, the climb of the decay (if any) and its cap.
    assert decays[0] == 0.0 and decays[-1] == decay
    climbing = [d for d in decays if 0.0 < d < decay]
    assert len(climbing) >= 2 if power is not None else not climbing
    assert not torch.allclose(ours.model.lin.weight, model.lin.weight)


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
