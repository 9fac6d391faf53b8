"""models/ema_best.pt: the EMA weights of the best training-time score, kept across kill and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import one_thread, random_images, tiny_diffusion, tiny_model, tiny_train, train_outputs

from ddpm_cifar.models import checkpoint
from ddpm_cifar.runtime.errors import UserError
from ddpm_cifar.training.loop import TrainingEval, TrainOutputs, TrainResult, train

IMAGES = random_images(n=12, size=8, seed=3)
CPU = torch.device("cpu")
# The training-time FID at steps 1..6: the lowest mid-run (step 3), as when a model starts to overfit.
MID_RUN_MINIMUM = [5.0, 3.0, 1.0, 2.0, 4.0, 6.0]


class Scripted:
    """A training-time evaluation that returns scripted FIDs, one per step (train.fid_every = 1), and
    keeps a copy of the EMA weights it was shown at each step. ``die_at`` raises KeyboardInterrupt
    (a kill) inside the evaluation of that step."""

    def __init__(self, scores: list[float], step: int = 0, die_at: int | None = None):
        self.scores, self.step, self.die_at = scores, step, die_at
        self.ema: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, model: torch.nn.Module, diffusion: object) -> dict[str, float]:
        self.step += 1
        if self.step == self.die_at:
            raise KeyboardInterrupt
        self.ema[self.step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"fid": self.scores[self.step - 1]}


def _outputs(root: Path) -> TrainOutputs:
    outputs = train_outputs(root)
    outputs.ema_best = root / "ema_best.pt"
    return outputs


def _train(root: Path, scripted: Scripted, metric: str | None = "fid", fid_id: str = "ref") -> TrainResult:
    cfg = tiny_train(steps=6, checkpoint_every=2, fid_every=1, best_metric=metric)
    with one_thread():
        return train(tiny_model(), tiny_diffusion(), cfg, images=IMAGES, data_id="d", outputs=_outputs(root),
                     device=CPU, evaluation=TrainingEval(scripted, id=fid_id), log=lambda _: None)


def _weights(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ckpt = checkpoint.load(path)
    return ckpt["step"], ckpt["ema"]


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_best_weights_are_the_ema_at_the_step_of_the_lowest_score(tmp_path: Path) -> None:
    scripted = Scripted(MID_RUN_MINIMUM)
    result = _train(tmp_path, scripted)
    step, weights = _weights(tmp_path / "ema_best.pt")
    assert step == 3 and result.best == {"metric": "fid", "step": 3, "score": 1.0}
    _assert_equal(weights, scripted.ema[3])
    final_step, final = _weights(tmp_path / "ema.pt")
    assert final_step == 6 and not all(torch.equal(final[k], weights[k]) for k in final)  # not the final EMA
    assert result.metrics()["best_step"] == 3
    loaded = checkpoint.load_model(tmp_path / "ema_best.pt")
    assert loaded.step == 3  # what the sample stage's report names


def test_a_kill_between_an_improvement_and_its_checkpoint_keeps_the_best_exactly(tmp_path: Path) -> None:
    """The best improves at step 5 (checkpoints at 2, 4, 6) and the run dies in step 6's evaluation: on
    disk the best stays that of the checkpoint at step 4 (step 3), and the resumed run ends with the
    uninterrupted run's best weights (step 5)."""
    scores = [5.0, 3.0, 1.0, 2.0, 0.5, 6.0]
    straight = Scripted(scores)
    _train(tmp_path / "straight", straight)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        _train(killed, Scripted(scores, die_at=6))
    assert _weights(killed / "ema_best.pt")[0] == 3 and checkpoint.load(killed / "checkpoint.pt")["step"] == 4
    (killed / "ema_best.pt").unlink()  # DVC removes a stage's outputs before it reruns it
    result = _train(killed, Scripted(scores, step=4))  # resumes at the checkpoint of step 4
    assert result.resumed_from == 4 and result.best == {"metric": "fid", "step": 5, "score": 0.5}
    step, weights = _weights(killed / "ema_best.pt")
    assert step == 5
    _assert_equal(weights, straight.ema[5])
    _assert_equal(weights, _weights(tmp_path / "straight" / "ema_best.pt")[1])


def test_a_resumed_run_keeps_a_best_from_before_its_checkpoint(tmp_path: Path) -> None:
    """Killed at step 5 (after the checkpoint of step 4): the best (step 3) came before the checkpoint and is
    not measured again, yet the finished run still names it."""
    _train(tmp_path / "straight", straight := Scripted(MID_RUN_MINIMUM))
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        _train(killed, Scripted(MID_RUN_MINIMUM, die_at=5))
    (killed / "ema_best.pt").unlink()
    result = _train(killed, Scripted(MID_RUN_MINIMUM, step=4))
    assert result.best is not None and result.best["step"] == 3
    _assert_equal(_weights(killed / "ema_best.pt")[1], straight.ema[3])


def test_a_new_reference_starts_the_best_over(tmp_path: Path) -> None:
    """Scores against another reference do not compare with the old best: it is dropped with the curve."""
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, Scripted(MID_RUN_MINIMUM, die_at=5), fid_id="old")
    result = _train(tmp_path, Scripted([9.0] * 4 + [8.0, 7.0], step=4), fid_id="new")
    assert result.best == {"metric": "fid", "step": 6, "score": 7.0}


def test_without_a_best_metric_the_file_says_why_and_sampling_it_is_one_line(tmp_path: Path) -> None:
    _train(tmp_path, Scripted(MID_RUN_MINIMUM), metric=None)
    with pytest.raises(UserError) as info:
        checkpoint.load_model(tmp_path / "ema_best.pt")
    message = str(info.value)
    assert "holds no weights: train.best_metric is null" in message and "\n" not in message
    assert "set sample.weights to final" in message


def test_a_metric_that_is_not_measured_keeps_no_best(tmp_path: Path) -> None:
    """best_metric kid with an evaluation that measures FID only (a reference without features)."""
    result = _train(tmp_path, Scripted(MID_RUN_MINIMUM), metric="kid")
    assert result.best is None
    with pytest.raises(UserError, match="no training-time kid was measured"):
        checkpoint.load_model(tmp_path / "ema_best.pt")
