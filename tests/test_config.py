"""Every config option composes and builds; bad values fail naming the key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from isodiff.config import (
    DataConfig,
    DiffusionConfig,
    IsoMetric,
    ModelConfig,
    OptimConfig,
    to_train_config,
)
from isodiff.errors import ConfigError
from isodiff.model.unet import build_unet
from tests.conftest import CONF, compose_train

GROUPS = ["data", "model", "diffusion", "optim", "tier"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def _overrides(group: str, option: str) -> list[str]:
    extra = {
        ("data", "folder"): ["data.root=/nonexistent"],
        # 6 blocks halve the image 5 times: the smoke tier's 16 px cannot pass
        ("model", "ddpm_256"): ["data.resolution=32"],
        ("tier", "paper"): ["init_from=/nonexistent", "data.root=/nonexistent"],
    }
    tier = [] if group == "tier" else ["tier=smoke"]
    return [*tier, f"{group}={option}", *extra.get((group, option), [])]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group: str, option: str, tmp_path) -> None:
    cfg = to_train_config(compose_train(_overrides(group, option), tmp_path))
    assert cfg.tier.name == (option if group == "tier" else "smoke")
    # ddpm_256 (113 M parameters): test_models; ldm_celebahq256 (274 M): test_bench_paper
    if group == "model" and option not in ("ddpm_256", "ldm_celebahq256"):
        unet = build_unet(cfg.model)
        assert unet.config.sample_size == cfg.data.resolution


SCHEMAS = {
    "data": DataConfig,
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "optim": OptimConfig,
}


@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_defaults_have_one_source_the_schema(group: str) -> None:
    """A preset sets only what makes it that preset: no value that repeats the schema's
    default, so that the schema and the YAML can never disagree."""
    defaults = OmegaConf.to_container(OmegaConf.structured(SCHEMAS[group]), enum_to_str=True)
    for path in sorted((CONF / group).glob("*.yaml")):
        preset = OmegaConf.to_container(OmegaConf.load(path))
        repeated = [k for k, v in preset.items() if k != "name" and defaults.get(k) == v]
        assert not repeated, f"{path.name} repeats the schema's defaults of {repeated}"


def test_defaults_are_the_quick_tier_and_plain_ddpm(tmp_path) -> None:
    cfg = to_train_config(compose_train([], tmp_path))
    assert cfg.tier.name == "quick" and cfg.lambda_iso == 0 and not cfg.regularised
    assert cfg.iso.metric == IsoMetric.spherical and cfg.model.name == "small"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lambda_iso=-1", "lambda_iso"),
        ("iso.window=1.0", "iso.window"),
        ("iso.window=-0.1", "iso.window"),
        ("iso.n_probes=0", "iso.n_probes"),
        ("train.steps=0", "train.steps"),
        ("optim.lr=0", "optim.lr"),
        ("model.norm_num_groups=5", "model.norm_num_groups"),
    ],
)
def test_out_of_range_values_name_the_key(override: str, key: str, tmp_path) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}="):
        to_train_config(compose_train(["tier=smoke", override], tmp_path))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("iso.metric=cosine", "iso.metric"),
        ("lambda_iso=abc", "lambda_iso"),
        ("iso.typo=1", "iso.typo"),
        ("train.batchsize=3", "train.batchsize"),
    ],
)
def test_unknown_keys_and_types_fail_at_composition(override: str, key: str, tmp_path) -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_train(["tier=smoke", override], tmp_path)
    assert key.split(".")[-1] in str(err.value) + str(err.value.__cause__)


def test_forced_new_keys_are_refused_too(tmp_path) -> None:
    cfg = compose_train(["tier=smoke", "+iso.typo=1"], tmp_path)
    with pytest.raises(ConfigError, match="^iso.typo is not a config key"):
        to_train_config(cfg)


def test_unknown_dataset_lists_the_options(tmp_path) -> None:
    with pytest.raises(ConfigCompositionException, match="celeba"):
        compose_train(["tier=smoke", "data=celeba"], tmp_path)


def test_job_folder_is_stable_and_readable(tmp_path) -> None:
    a = compose_train(["tier=smoke", "lambda_iso=0.001"], tmp_path).hydra.run.dir
    b = compose_train(["tier=smoke", "lambda_iso=0.001"], tmp_path).hydra.run.dir
    c = compose_train(["tier=smoke", "lambda_iso=0.01"], tmp_path).hydra.run.dir
    assert a == b != c
    assert "/smoke/default/lambda_iso=0.001-" in a
