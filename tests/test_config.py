"""Tests for ddpm_cifar.runtime.config: the repo's params.yaml parses, and loading is strict."""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from committed import committed_text

from ddpm_cifar.runtime.config import (
    SECTIONS,
    DataConfig,
    DiffusionConfig,
    FidConfig,
    ModelConfig,
    SampleConfig,
    SamplerConfig,
    TrainConfig,
    WandbConfig,
    to_dict,
)
from ddpm_cifar.runtime.errors import ConfigError, UserError
from ddpm_cifar.runtime.params_file import Params, load_params

# As committed, not as an experiment in the workspace may have left it (tests/committed.py).
REPO_PARAMS_TEXT = committed_text("params.yaml")

# A complete, valid params file, written out by the tests (the repo's file may be changed by a
# running experiment while the tests run).
BASE: dict[str, dict[str, Any]] = {
    "data": {"source": "official", "md5": "c58f30108f718f92721af3b95e74349a"},
    "model": {"image_size": 32, "channels": 3, "dim": 64, "dim_mults": [1, 2, 4, 8], "num_res_blocks": 2,
              "full_attn": [False, False, False, True], "attn_heads": 4, "attn_dim_head": 32,
              "dropout": 0.0, "arch": "unet"},
    "diffusion": {"timesteps": 1000, "beta_schedule": "sigmoid", "objective": "pred_v",
                  "min_snr_gamma": None},
    "train": {"steps": 20000, "batch_size": 64, "grad_accum": 2, "lr": 0.0001, "adam_betas": [0.9, 0.99],
              "max_grad_norm": 1.0, "ema_decay": 0.995, "ema_update_every": 10, "ema_start_step": 100,
              "amp": True, "seed": 0, "checkpoint_every": 1000, "fid_every": 0,
              "fid_samples": 1000,
              "fid_sampler": {"name": "dpmpp_2m", "steps": 20, "spacing": "quadratic", "eta": 0.0,
                              "variance": "posterior", "clip_x0": True},
              "fid_batch_size": 250, "sample_grid_every": 0, "ema_inv_gamma": 1.0,
              "ema_power": 0.6666666666666666, "warmup_steps": 0, "best_metric": None},
    "sample": {"n": 10000,
               "sampler": {"name": "ddpm", "steps": 1000, "spacing": "quadratic", "eta": 0.0,
                           "variance": "posterior", "clip_x0": True},
               "weights": "final", "compile": True, "batch_size": 250, "seed": 0,
               "grid_images": 64, "strip_seeds": [0, 1, 2, 3], "strip_frames": 20},
    "fid": {"inception_weights": "data/inception/pt_inception.pth", "reference": "train",
            "reference_count": 0, "reference_features": 10000, "batch_size": 200,
            "exact_inception": False},
    "wandb": {"enabled": False, "project": "ddpm", "run_name": None, "entity": None, "mode": "online"},
    "pretrained": {"enabled": False, "folder": "models/ddpm-cifar10-32"},
    "frontier": {"enabled": False, "n": 1000, "batch_size": 250,
                 "curves": [{"name": "ddim", "steps": [10, 20], "spacing": "quadratic", "eta": 0.0,
                             "variance": "posterior", "clip_x0": True},
                            {"name": "ddpm", "steps": [100], "spacing": "uniform", "eta": 0.0,
                             "variance": "beta",
                             "clip_x0": True}]},
    "distributed": {"nnodes": 1, "nproc_per_node": 2, "rdzv_endpoint": "localhost:0"},
}


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[..., Path]:
    """Write BASE, changed by ``edit(raw)``, as a params file; return its path."""

    def write(edit: Callable[[dict], None] | None = None, text: str | None = None) -> Path:
        raw = copy.deepcopy(BASE)
        if edit is not None:
            edit(raw)
        path = tmp_path / "params.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


def _load_all(path: Path) -> dict[str, Any]:
    params = load_params(path, tuple(SECTIONS))
    return {name: params.section(name) for name in SECTIONS}


# -- the repo's params.yaml ----------------------------------------------------------------------

def test_repo_params_yaml_parses_fully(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(REPO_PARAMS_TEXT)
    sections = _load_all(path)
    for name, cls in SECTIONS.items():
        assert isinstance(sections[name], cls)
    model = sections["model"]
    assert len(model.full_attn) == len(model.dim_mults)


def test_base_params_parse_into_typed_dataclasses(write_params) -> None:
    s = _load_all(write_params())
    assert s["data"] == DataConfig(source="official", md5="c58f30108f718f92721af3b95e74349a")
    assert s["model"] == ModelConfig(image_size=32, channels=3, dim=64, dim_mults=(1, 2, 4, 8),
                                     num_res_blocks=2, full_attn=(False, False, False, True),
                                     attn_heads=4, attn_dim_head=32, dropout=0.0, arch="unet")
    assert s["sample"].sampler == SamplerConfig("ddpm", 1000, "quadratic", 0.0, "posterior", True)
    assert s["train"].fid_sampler == SamplerConfig("dpmpp_2m", 20, "quadratic")
    assert s["diffusion"] == DiffusionConfig(timesteps=1000, beta_schedule="sigmoid", objective="pred_v",
                                             min_snr_gamma=None)
    train = s["train"]
    assert isinstance(train, TrainConfig)
    assert train.adam_betas == (0.9, 0.99) and isinstance(train.adam_betas, tuple)
    assert train.lr == 0.0001 and train.amp is True
    assert isinstance(s["sample"], SampleConfig) and s["sample"].strip_seeds == (0, 1, 2, 3)
    assert isinstance(s["fid"], FidConfig) and s["fid"].reference_count == 0
    assert s["wandb"] == WandbConfig(enabled=False, project="ddpm", run_name=None, entity=None, mode="online")
    # to_dict gives the YAML data back.
    for name in SECTIONS:
        assert to_dict(s[name]) == BASE[name]


# -- strict errors -------------------------------------------------------------------------------

def _error(path: Path) -> str:
    """The message of the ConfigError that loading every section of ``path`` raises."""
    with pytest.raises(ConfigError) as info:
        _load_all(path)
    message = str(info.value)
    assert "\n" not in message  # one line, for the stage's error output
    assert isinstance(info.value, UserError)
    return message


@pytest.mark.parametrize(("section", "key"), [("train", "lr"), ("model", "dim_mults"),
                                              ("data", "md5"), ("wandb", "run_name"),
                                              # defaults for code only: params.yaml must name them
                                              ("train", "ema_power"), ("train", "ema_inv_gamma")])
def test_missing_key_names_it(write_params, section: str, key: str) -> None:
    message = _error(write_params(lambda raw: raw[section].pop(key)))
    assert f"{section}.{key}" in message
    assert "missing" in message


@pytest.mark.parametrize(("section", "key"), [("train", "learning_rate"), ("sample", "temperature"),
                                              ("model", "Dim")])
def test_unknown_key_names_it(write_params, section: str, key: str) -> None:
    message = _error(write_params(lambda raw: raw[section].update({key: 1})))
    assert f"{section}.{key}" in message
    assert "unknown" in message


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("train", "steps", "100", "train.steps"),  # string for int
        ("train", "steps", True, "train.steps"),  # bool for int
        ("train", "steps", 100.0, "train.steps"),  # float for int
        ("train", "lr", [0.1], "train.lr"),  # list for float
        ("train", "lr", "fast", "train.lr"),
        ("train", "lr", False, "train.lr"),  # bool for float
        ("train", "amp", 1, "train.amp"),  # int for bool
        ("train", "amp", "yes please", "train.amp"),
        ("data", "source", 5, "data.source"),  # int for str
        ("train", "max_grad_norm", "none", "train.max_grad_norm"),  # optional float
        ("train", "ema_power", "2/3", "train.ema_power"),
        ("train", "ema_inv_gamma", None, "train.ema_inv_gamma"),  # null only where documented
        ("model", "dim_mults", 4, "model.dim_mults"),  # scalar for list
        ("model", "dim_mults", [1, "2"], "model.dim_mults[1]"),  # bad element
        ("train", "adam_betas", [0.9], "train.adam_betas"),  # fixed-length pair
        ("train", "adam_betas", [0.9, 0.99, 0.999], "train.adam_betas"),
        ("diffusion", "objective", "pred_eps", "diffusion.objective"),  # not a choice
        ("wandb", "mode", "sometimes", "wandb.mode"),
    ],
)
def test_wrong_type_names_the_key(write_params, section: str, key: str, value: Any, named: str) -> None:
    message = _error(write_params(lambda raw: raw[section].update({key: value})))
    assert named in message


def test_exponent_without_dot_is_a_float(write_params) -> None:
    text = yaml.safe_dump(BASE, sort_keys=False).replace("lr: 0.0001", "lr: 1e-4")
    assert "lr: 1e-4" in text
    text = text.replace("max_grad_norm: 1.0", "max_grad_norm: 2E+0")
    train = load_params(write_params(text=text), ["train"]).section("train")
    assert train.lr == 0.0001 and isinstance(train.lr, float)
    assert train.max_grad_norm == 2.0
    # Plain integers stay integers, and a float field accepts them as floats.
    text = text.replace("lr: 1e-4", "lr: 1")
    train = load_params(write_params(text=text), ["train"]).section("train")
    assert train.lr == 1.0 and isinstance(train.lr, float)
    assert train.steps == 20000 and isinstance(train.steps, int)


def test_exponent_is_not_an_integer(write_params) -> None:
    message = _error(write_params(text=yaml.safe_dump(BASE, sort_keys=False).replace("steps: 20000",
                                                                                      "steps: 2e4")))
    assert "train.steps" in message


def test_null_for_optional_fields(write_params) -> None:
    def edit(raw: dict) -> None:
        raw["data"]["md5"] = None
        raw["train"]["max_grad_norm"] = None
        raw["diffusion"]["min_snr_gamma"] = None

    s = _load_all(write_params(edit))
    assert s["data"].md5 is None
    assert s["train"].max_grad_norm is None
    assert s["diffusion"].min_snr_gamma is None
    # A value is still accepted and typed: int -> float for min_snr_gamma.
    s = _load_all(write_params(lambda raw: raw["diffusion"].update(min_snr_gamma=5)))
    assert s["diffusion"].min_snr_gamma == 5.0 and isinstance(s["diffusion"].min_snr_gamma, float)


def test_null_for_a_required_field_is_an_error(write_params) -> None:
    assert "train.lr" in _error(write_params(lambda raw: raw["train"].update(lr=None)))
    assert "data.source" in _error(write_params(lambda raw: raw["data"].update(source=None)))


def test_unknown_section_is_an_error(write_params) -> None:
    path = write_params(lambda raw: raw.update(optimizer={"lr": 1}))
    with pytest.raises(ConfigError, match="optimizer"):
        load_params(path, ["train"])


def test_missing_section_is_an_error_when_read(write_params) -> None:
    path = write_params(lambda raw: raw.pop("fid"))
    params = load_params(path, ["fid", "train"])
    assert params.section("train").steps == 20000  # other sections still load
    with pytest.raises(ConfigError, match="fid"):
        params.section("fid")


def test_section_that_is_not_a_mapping(write_params) -> None:
    path = write_params(lambda raw: raw.update(wandb=None))
    with pytest.raises(ConfigError, match="wandb"):
        load_params(path, ["wandb"]).section("wandb")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "train: [unclosed\n"])
def test_file_that_is_not_a_mapping_or_not_yaml(write_params, text: str) -> None:
    with pytest.raises(ConfigError, match="params.yaml"):
        load_params(write_params(text=text), ["train"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml", ["train"])


def test_post_init_checks(write_params) -> None:
    assert "model.full_attn" in _error(write_params(lambda raw: raw["model"].update(full_attn=[True])))
    assert "train.ema_decay" in _error(write_params(lambda raw: raw["train"].update(ema_decay=1.0)))
    assert "train.steps" in _error(write_params(lambda raw: raw["train"].update(steps=0)))
    assert "diffusion.timesteps" in _error(write_params(lambda raw: raw["diffusion"].update(timesteps=1)))


@pytest.mark.parametrize(("key", "value"), [("ema_power", 0.0), ("ema_power", -0.5),
                                            ("ema_power", float("nan")), ("ema_inv_gamma", 0.0),
                                            ("ema_inv_gamma", -1.0), ("ema_inv_gamma", float("inf")),
                                            ("ema_start_step", -1)])
def test_ema_warm_up_ranges(write_params, key: str, value: float) -> None:
    message = _error(write_params(lambda raw: raw["train"].update({key: value})))
    assert message.startswith(f"train.{key} must be")


def test_ema_power_null_turns_the_warm_up_off(write_params) -> None:
    train = _load_all(write_params(lambda raw: raw["train"].update(ema_power=None)))["train"]
    assert train.ema_power is None and train.ema_inv_gamma == 1.0
    train = _load_all(write_params(lambda raw: raw["train"].update(ema_power=1, ema_start_step=0)))["train"]
    assert train.ema_power == 1.0 and isinstance(train.ema_power, float) and train.ema_start_step == 0


# -- declared params -----------------------------------------------------------------------------

def test_params_refuses_undeclared_sections_and_keys(write_params) -> None:
    params = load_params(write_params(), ["train", "fid.inception_weights"])
    assert params.section("train").steps == 20000
    with pytest.raises(RuntimeError, match="'sample'"):
        params.section("sample")
    with pytest.raises(RuntimeError, match="fid"):
        params.section("fid")  # only one of its keys is declared
    with pytest.raises(RuntimeError, match="fid.batch_size"):
        params.key("fid.batch_size")
    with pytest.raises(RuntimeError, match="train.lr"):
        params.key("train.lr")  # declaring a section does not declare its keys one by one


def test_params_key_works_with_only_that_key_declared(write_params) -> None:
    params = load_params(write_params(), ["fid.inception_weights"])
    assert params.key("fid.inception_weights") == "data/inception/pt_inception.pth"
    with pytest.raises(RuntimeError, match="without declaring it"):
        params.key("fid.batch_size")


def test_the_whole_file_is_checked_whatever_the_stage_reads(write_params) -> None:
    """A value that would stop a later stage stops the first: evaluate, declaring one fid key, still
    refuses a broken train section, and the sample stage a sampler of more steps than the diffusion
    has timesteps, before training runs for hours."""
    with pytest.raises(ConfigError, match="^train.lr must be"):
        load_params(write_params(lambda raw: raw["train"].update(lr=-1)), ["fid.inception_weights"])
    for block, where in ((lambda raw: raw["sample"]["sampler"], "sample.sampler"),
                         (lambda raw: raw["train"]["fid_sampler"], "train.fid_sampler")):
        path = write_params(lambda raw, block=block: block(raw).update(steps=5000))
        message = rf"^{where}\.steps 5000 exceeds the model's diffusion\.timesteps 1000$"
        with pytest.raises(ConfigError, match=message):
            load_params(path, ["fid.inception_weights"])
        at_the_limit = write_params(lambda raw, block=block: block(raw).update(steps=1000))
        load_params(at_the_limit, ["fid.inception_weights"])


def test_params_key_is_type_checked(write_params) -> None:
    path = write_params(lambda raw: raw["fid"].update(inception_weights=3))
    with pytest.raises(ConfigError, match="fid.inception_weights"):
        load_params(path, ["fid.inception_weights"]).key("fid.inception_weights")
    path = write_params(lambda raw: raw["fid"].pop("inception_weights"))
    with pytest.raises(ConfigError, match="fid.inception_weights"):
        load_params(path, ["fid.inception_weights"]).key("fid.inception_weights")


def test_params_as_dict_holds_what_was_declared(write_params) -> None:
    params = load_params(write_params(), ["train", "fid.inception_weights", "wandb"])
    assert params.as_dict() == {"train": BASE["train"], "wandb": BASE["wandb"],
                                "fid": {"inception_weights": "data/inception/pt_inception.pth"}}
    with pytest.raises(ConfigError, match="train.lr"):  # the whole file is checked when read
        load_params(write_params(lambda raw: raw["train"].update(lr="fast")), ["train"])


def test_params_key_must_be_a_field() -> None:
    params = Params({}, ["fid.weights"])
    with pytest.raises(RuntimeError, match="fid.weights"):
        params.key("fid.weights")


def test_config_knows_the_samplers_the_library_has() -> None:
    from ddpm_cifar.diffusion.samplers import SAMPLERS, spaced_timesteps
    from ddpm_cifar.runtime.config import SAMPLER_NAMES, SPACING_NAMES

    assert tuple(SAMPLERS) == SAMPLER_NAMES
    for spacing in SPACING_NAMES:
        assert len(spaced_timesteps(100, 10, spacing)) == 10, spacing


def test_a_sampler_block_is_read_key_by_key_and_named_in_errors(write_params) -> None:
    path = write_params(lambda raw: raw["sample"]["sampler"].update(name="ddim", steps=50, eta=0.5))
    assert load_params(path, ["sample"]).section("sample").sampler == SamplerConfig(
        "ddim", 50, "quadratic", 0.5, "posterior", True)
    def sampler(raw: dict) -> dict:
        return raw["sample"]["sampler"]

    for edit, match in [
        (lambda raw: sampler(raw).update(steps="many"), r"^sample\.sampler\.steps must be an integer"),
        (lambda raw: sampler(raw).update(typo=1), r"^unknown key sample\.sampler\.typo \(known: name,"),
        (lambda raw: sampler(raw).pop("eta"), r"^missing key sample\.sampler\.eta$"),
        (lambda raw: raw["sample"].update(sampler="ddpm"),
         r"^sample\.sampler must be a mapping of name, steps, spacing, eta, variance, clip_x0; got 'ddpm'$"),
        (lambda raw: raw["train"]["fid_sampler"].update(eta=2),
         r"^train\.fid_sampler\.eta must be in \[0, 1\]"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_params(write_params(edit), ["sample", "train"]).as_dict()


def test_distributed_section_checks() -> None:
    from ddpm_cifar.runtime.config import DistributedConfig

    assert DistributedConfig(nnodes=2, nproc_per_node=4, rdzv_endpoint="node0:29500").world_size == 8
    with pytest.raises(ConfigError, match="distributed.nproc_per_node"):
        DistributedConfig(nnodes=1, nproc_per_node=0, rdzv_endpoint="localhost:0")
    with pytest.raises(ConfigError, match="distributed.rdzv_endpoint"):
        DistributedConfig(nnodes=1, nproc_per_node=1, rdzv_endpoint="node0")
    with pytest.raises(ConfigError, match="must name the first node's host and a fixed port"):
        DistributedConfig(nnodes=2, nproc_per_node=1, rdzv_endpoint="localhost:0")


def test_launched_ranks_must_match_params() -> None:
    from ddpm_cifar.runtime.config import DistributedConfig
    from ddpm_cifar.runtime.errors import UserError
    from ddpm_cifar.runtime.stage import launched_ranks

    two = DistributedConfig(nnodes=1, nproc_per_node=2, rdzv_endpoint="localhost:0")
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    assert launched_ranks(two, env) == (2, 1, 1)
    one = DistributedConfig(nnodes=1, nproc_per_node=1, rdzv_endpoint="localhost:0")
    assert launched_ranks(one, {}) == (1, 0, 0)  # plain `python stages/x.py`
    # Started alone while params ask for 2: dvc.lock would record a world size that did not run.
    with pytest.raises(UserError, match=r"asks for 2 processes .* this run has 1"):
        launched_ranks(two, {})


def _leaf_types(tp: Any) -> set[Any]:
    """The plain types inside an annotation: ``tuple[int, ...] | None`` -> {int, NoneType}."""
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    return set().union(*(_leaf_types(a) for a in args)) if args else {tp}


def test_every_numeric_field_has_a_range() -> None:
    """A numeric field added without a bound would reach torch unchecked; a bound for a field that
    does not exist (a typo) would check nothing."""
    from ddpm_cifar.runtime.bounds import BOUNDS, PATTERNS

    fields = {f"{s}.{k}": tp for s, cls in SECTIONS.items() for k, tp in typing.get_type_hints(cls).items()
              if tp is not SamplerConfig}
    # the sampler block, in sample and train alike, has its bounds under "sampler."
    fields |= {f"sampler.{f.name}": typing.get_type_hints(SamplerConfig)[f.name]
               for f in dataclasses.fields(SamplerConfig)}
    numeric = {key for key, tp in fields.items() if _leaf_types(tp) & {int, float}}
    assert set(BOUNDS) == numeric
    assert set(PATTERNS) <= {key for key, tp in fields.items() if str in _leaf_types(tp)}
