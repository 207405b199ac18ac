"""Cluster profiles (conf/cluster/*): each composes with train.yaml; typos fail early."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from isodiff.config import compose
from tests.conftest import CONF, compose_train

LAUNCHERS = {
    "local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "local_pool": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "slurm_local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "example": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
}


def test_every_profile_is_tested() -> None:
    assert {p.stem for p in (CONF / "cluster").glob("*.yaml")} == set(LAUNCHERS)


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_profile_composes(name: str, tmp_path: Path) -> None:
    if name == "local_pool":
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = compose_train([f"cluster={name}", "tier=smoke"], tmp_path)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == LAUNCHERS[name]
    # A profile sets only hydra.launcher: it works for every entry point (train, evaluate)
    # and changes neither what a job computes nor its folder name.
    plain = compose_train(["tier=smoke"], tmp_path)
    drop_hydra = [k for k in cfg if k != "hydra"]
    assert OmegaConf.masked_copy(cfg, drop_hydra) == OmegaConf.masked_copy(plain, drop_hydra)
    assert cfg.name == plain.name


def test_slurm_profiles_fit_the_submitit_schema(tmp_path: Path) -> None:
    cfg = compose_train(["cluster=example", "tier=paper", "init_from=/x", "data.root=/y"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher.gpus_per_node == launcher.tasks_per_node  # one task per GPU
    assert launcher.max_num_timeout > 0  # jobs resume, so timeouts may requeue them
    # setup lines reach sbatch verbatim (no OmegaConf interpolation in shell code)
    setup = OmegaConf.to_container(launcher, resolve=True)["setup"]
    assert any("OMP_NUM_THREADS=$((" in line for line in setup)


def test_command_line_typo_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="partiton"):
        compose_train(["cluster=slurm_local", "hydra.launcher.partiton=gpu"], tmp_path)


def test_profile_typo_fails_at_composition(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    text = (conf / "cluster" / "slurm_local.yaml").read_text()
    assert "    partition: debug" in text
    (conf / "cluster" / "typo.yaml").write_text(
        text.replace("    partition: debug", "    partiton: debug")
    )
    with pytest.raises(ConfigCompositionException, match="partiton"):
        compose("train", ["cluster=typo"], conf=conf, hydra_node=True)
