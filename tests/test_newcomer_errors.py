"""The first hour of a new user (issue 27, item 6): a misspelt key, option or value gets "did
you mean" in one line; run= names what is wrong with the folder (missing, no run, a job still
training) and writes nothing; the library's misuse says the right call, not torch's error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from isodiff import Regulariser, h_encoder
from isodiff.cli import one_line, parse_options
from isodiff.config import compose, tier_config, to_train_config
from isodiff.errors import ConfigError, UserError
from isodiff.evaluate.config import register_schemas, to_evaluate_config
from isodiff.runs.running import STALE_S, check_job_ended
from isodiff.runs.status import read_status
from isodiff.sweep.specs import load_spec
from tests.conftest import compose_train, refusal, run_cli

register_schemas()


@pytest.mark.parametrize(
    ("config", "override", "line"),
    [
        ("train", "lamda_iso=1", "lamda_iso is not a config key: did you mean lambda_iso?"),
        ("train", "iso.metrc=euclidean", "iso.metrc is not a config key: did you mean iso.metric?"),
        ("train", "iso.metric=spherial", "iso.metric=spherial: no such option; did you mean "),
        ("train", "data=shape", "data=shape: no such option; did you mean data=shapes?"),
        ("evaluate", "eval=quik", "eval=quik: no such option; did you mean eval=quick?"),
        ("evaluate", "baatch_size=3", "baatch_size is not a config key: did you mean batch_size?"),
    ],
)
def test_a_misspelt_key_or_value_gets_did_you_mean_in_one_line(
    config: str, override: str, line: str
) -> None:
    """As hydra_main reports Hydra's composition errors (cli.one_line)."""
    with pytest.raises((HydraException, OmegaConfBaseException)) as caught:
        compose(config, ["run=/nowhere", override] if config == "evaluate" else [override])
    message = one_line(caught.value, f"python -m isodiff.{config}")
    assert message.startswith(line) and "\n" not in message, message
    assert f"python -m isodiff.{config} --cfg job" in message or "choose one of" in message


def test_did_you_mean_reaches_forced_keys_metrics_tiers_and_key_value_options() -> None:
    cfg = compose_train(["+lamda=1"])
    with pytest.raises(ConfigError, match="lamda is not a config key: did you mean lambda_iso?"):
        to_train_config(cfg)
    with pytest.raises(ConfigError, match=r"unknown \['fdi'\]; did you mean fid\?"):
        to_evaluate_config(compose("evaluate", ["run=/nowhere", "metrics=[fdi]"]))
    with pytest.raises(ConfigError, match="did you mean tier=quick?"):
        tier_config("quik")
    with pytest.raises(UserError, match="unknown option tierr=: did you mean tier=?"):
        parse_options(["tierr=smoke"], ("tier", "datasets"))
    with pytest.raises(UserError, match="unknown option --plna: did you mean --plan?"):
        parse_options(["--plna"], ("tier",), flags=("--plan",))
    with pytest.raises(ConfigError, match="spec 'tabel_1' not found; did you mean table_1?"):
        load_spec("tabel_1")
    with pytest.raises(UserError, match=r"unknown option zzz=: the options are tier="):
        parse_options(["zzz=1"], ("tier",))  # nothing close: no guess


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_run_names_a_missing_folder_a_folder_of_no_run_and_a_job_still_training(
    tmp_path: Path,
) -> None:
    """Each one line, exit 2, nothing written; the missing folder holds '=' and ',' as job
    folders do, and is not blamed on quoting."""
    job = tmp_path / "runs" / "quick" / "mnist" / "lambda_iso=0.001,seed=0-abc"
    job.mkdir(parents=True)
    status = {"state": "running", "pid": os.getpid(), "host": socket.gethostname()}
    (job / "status.json").write_text(json.dumps({**status, "updated": "2026-01-01T00:00:00"}))
    cases = {
        str(job.parent / "lambda_iso=0.01,seed=0-abc"): [
            "does not exist",
            f"did you mean run={job}?",
        ],
        str(tmp_path / "runs" / "quick"): [
            "is not a run folder (it holds no status.json)",
            "status.json, config.yaml and final/",
            f"e.g. run={job}",
        ],
        str(job): ["is still training", f"pid {os.getpid()} on {status['host']}", "wait=true"],
    }
    before = _tree(tmp_path)
    for run, names in cases.items():
        result = run_cli("isodiff.evaluate", f"run={run}", "eval=smoke", HYDRA_FULL_ERROR="")
        line = refusal(result)
        assert all(name in line for name in names), line
        assert "train it first" not in line and "quoted" not in line
    assert _tree(tmp_path) == before


def _running(run_dir: Path, pid: int, host: str) -> None:
    status = {"state": "running", "pid": pid, "host": host, "updated": "2026-01-01T00:00:00"}
    (run_dir / "status.json").write_text(json.dumps(status))


def test_wait_true_waits_for_the_job_then_its_state_decides(tmp_path: Path) -> None:
    here = socket.gethostname()
    # a job that finishes when told to: it records done, then exits
    finish = (
        "import json, os, sys, time\n"
        "while not os.path.exists(sys.argv[2]): time.sleep(0.02)\n"
        "open(sys.argv[1] + '.tmp', 'w').write(json.dumps({'state': 'done'}))\n"
        "os.replace(sys.argv[1] + '.tmp', sys.argv[1])"
    )
    go = tmp_path / "go"
    job = subprocess.Popen([sys.executable, "-c", finish, str(tmp_path / "status.json"), str(go)])
    _running(tmp_path, job.pid, here)
    with pytest.raises(ConfigError, match="is still training"):
        check_job_ended(str(tmp_path))
    threading.Timer(0.5, go.touch).start()
    check_job_ended(str(tmp_path), wait=True, poll_s=0.05)  # returns once done
    assert read_status(tmp_path) == {"state": "done"}
    assert job.wait(timeout=30) == 0
    # a job killed before it could record anything: waiting ends, and says so
    _running(tmp_path, job.pid, here)  # that pid has exited
    with pytest.raises(ConfigError, match=r"has ended without recording why.*resumes it"):
        check_job_ended(str(tmp_path), wait=True, poll_s=0.05)
    # another host: its folder's writes say whether it lives
    _running(tmp_path, 12345, "some-other-node")
    with pytest.raises(ConfigError, match="is still training"):
        check_job_ended(str(tmp_path))
    old = time.time() - STALE_S - 60
    os.utime(tmp_path / "status.json", (old, old))
    with pytest.raises(ConfigError, match="has written nothing in it for over 30 minutes"):
        check_job_ended(str(tmp_path), wait=True)
    assert to_evaluate_config(compose("evaluate", ["run=/nowhere", "wait=true"])).wait


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def test_library_misuse_says_the_right_call() -> None:
    unet, reg = _unet(), Regulariser("spherical")
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([900, 950])
    with pytest.raises(TypeError, match=r"returned UNet2DOutput.*reg\(h_encoder\(unet\), x_t, t\)"):
        reg(unet, x_t, t)
    for wrong in (t[:1], t[0]):
        with pytest.raises(ValueError, match=r"one timestep per sample, t of shape \(2,\)"):
            reg(h_encoder(unet), x_t, wrong)

    class Pipeline:  # a diffusers pipeline holds its model
        def __init__(self) -> None:
            self.unet = unet

    with pytest.raises(TypeError, match=r"h_encoder\(pipe.unet\)"):
        h_encoder(Pipeline())  # type: ignore[arg-type]
    assert reg(h_encoder(unet), x_t, t).item() > 0


def test_an_empty_selection_adds_nothing() -> None:
    """x_t[mask] with no sample in the window (every other micro-batch at p = 0.5): 0, so the
    documented line needs no `if mask.any():`."""
    unet, reg = _unet(), Regulariser("spherical")
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 20])
    mask = t >= 500
    mse = unet(x_t, t).sample.square().mean()
    loss = mse + 0.1 * reg(h_encoder(unet), x_t[mask], t[mask])
    assert loss.item() == mse.item()
    loss.backward()  # the objective trains on as without the term
