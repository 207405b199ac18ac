"""A model isodiff did not train (isodiff.evaluate.released): a diffusers UNet2DModel saved
outside any run folder is evaluated in a folder of its own, identified by its files' sha256;
moved, it is the same model (nothing recomputed); one weight changed, another model."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from isodiff.analysis.collect import collect_runs
from isodiff.config import compose
from isodiff.errors import ConfigError
from isodiff.evaluate.config import EvaluateConfig, register_schemas, to_evaluate_config
from isodiff.evaluate.measure import evaluate_run
from isodiff.evaluate.released import EXPERIMENT, prepare, schedule
from isodiff.runs.status import read_status
from tests.conftest import run_cli

register_schemas()


def save_model(folder: Path, seed: int = 0) -> Path:
    """A tiny diffusers UNet2DModel (16 px RGB), saved as a release would be."""
    torch.manual_seed(seed)
    UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    ).save_pretrained(folder)
    return folder


def released_config(model: Path | str, run_root: Path, *extra: str) -> EvaluateConfig:
    return to_evaluate_config(
        compose(
            "evaluate",
            [
                f"released={model}",
                "data=shapes",
                "data.resolution=16",
                "data.size=64",
                "eval=smoke",
                f"run_root={run_root}",
                "progress=false",
                "device=cpu",
                "batch_size=16",
                *extra,
            ],
        )
    )


def evaluate_released(cfg: EvaluateConfig) -> tuple[Path, dict]:
    """What the command does: the model's folder, then evaluate_run on it."""
    cfg.run = str(prepare(cfg))
    return Path(cfg.run), evaluate_run(cfg)


@pytest.mark.slow
def test_a_released_model_is_evaluated_once_wherever_it_lies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, runs = save_model(tmp_path / "elsewhere" / "my-ddpm"), tmp_path / "runs"
    folder, record = evaluate_released(released_config(model, runs))
    assert folder.parent == runs / "smoke" / EXPERIMENT
    assert folder.name.startswith("my-ddpm-")
    assert not list(folder.rglob("*.safetensors"))  # the weights were not copied
    status = read_status(folder)
    assert status["state"] == "done" and status["released"]["source"] == str(model.resolve())
    assert set(status["weights"]) == {
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    }
    assert status["released"]["schedule"].startswith("conf/diffusion/ddpm.yaml")
    values = {k: v for entry in record["metrics"].values() for k, v in entry["values"].items()}
    assert len(record["metrics"]) >= 8 and not record.get("failed")
    assert all(math.isfinite(v) for v in values.values())
    assert {"fid", "slerp_istd", "slerp_pdv", "ppl_stylegan"} <= set(values)
    protocol = record["metrics"]["fid"]["protocol"]
    assert protocol["released"] is True and protocol["schedule"]["beta_end"] == 0.02
    metrics_json = (folder / "metrics.json").read_bytes()
    page = (folder / "report.md").read_text()  # its page, as a run's, says what it is
    assert page.startswith(f"# Released model {folder.name}")
    assert f"| released.sha256 | {status['released']['sha256']} |" in page
    assert "![samples](samples.png)" in page and "| fid | computed |" in page

    # Evaluated again where it lies: its folder is left as it was, byte for byte and mtime
    def snapshot() -> dict[str, tuple[int, bytes]]:
        return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*.*")}

    before = snapshot()
    assert evaluate_released(released_config(model, runs))[0] == folder
    assert snapshot() == before

    # Moved (and renamed): the same files, the same folder; nothing is recomputed.
    moved = tmp_path / "moved" / "renamed"
    moved.parent.mkdir()
    shutil.move(model, moved)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again, _ = evaluate_released(released_config(moved, runs))
    assert again == folder
    assert (folder / "metrics.json").read_bytes() == metrics_json
    assert "computing" not in caplog.text
    assert caplog.text.count("up to date with this protocol") == len(record["metrics"])
    assert read_status(folder)["released"]["source"] == str(moved.resolve())  # provenance

    # collect reads it like any run: done, its config and its values
    row = collect_runs(runs / "smoke").set_index("job").loc[folder.name]
    assert row["state"] == "done" and row["problem"] is None
    assert row["cfg.experiment"] == EXPERIMENT and row["fid"] == values["fid"]


def test_identity_is_the_files_not_the_path(tmp_path: Path) -> None:
    """Copied elsewhere: the same folder; one weight changed: another model, another folder;
    the files changed after their folder was made: refused, nothing measured."""
    runs = tmp_path / "runs"
    a = save_model(tmp_path / "a")
    first = prepare(released_config(a, runs))
    shutil.copytree(a, tmp_path / "copy")
    assert prepare(released_config(tmp_path / "copy", runs, "released_name=other")) == first

    changed = tmp_path / "changed"
    torch.manual_seed(0)
    unet = UNet2DModel.from_pretrained(a)
    with torch.no_grad():
        unet.conv_out.bias[0] += 1e-3
    unet.save_pretrained(changed)
    second = prepare(released_config(changed, runs))
    assert second != first and second.parent == first.parent
    digests = {read_status(f)["released"]["sha256"] for f in (first, second)}
    assert len(digests) == 2

    # the same folder measured from files that no longer match its record
    shutil.copy(
        changed / "diffusion_pytorch_model.safetensors",
        tmp_path / "copy" / "diffusion_pytorch_model.safetensors",
    )
    cfg = released_config(tmp_path / "copy", runs, "metrics=[liso]")
    cfg.run = str(first)  # (prepare would give the changed model its own folder)
    with pytest.raises(ConfigError, match="sha256 differs"):
        evaluate_run(cfg)
    assert (
        not (first / "metrics.json").exists()
        or "liso" not in json.loads((first / "metrics.json").read_text())["metrics"]
    )


def test_a_pipeline_folder_and_its_schedule(tmp_path: Path) -> None:
    """A pipeline folder: the U-Net under unet/ (only its files are the identity) and the
    schedule from scheduler/, recorded; without one, the suite's default."""
    pipeline = tmp_path / "pipe"
    save_model(pipeline / "unet")
    DDPMScheduler(beta_start=2e-4, beta_end=0.03, clip_sample=False).save_pretrained(
        pipeline / "scheduler"
    )
    folder = prepare(released_config(pipeline, tmp_path / "runs"))
    assert folder.name.startswith("pipe-")
    status = read_status(folder)
    assert set(status["weights"]) == {
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    }
    assert status["released"]["schedule"] == "scheduler/scheduler_config.json"
    config = (folder / "config.yaml").read_text()
    assert "beta_end: 0.03" in config and "clip_sample: false" in config
    # the same U-Net alone: the same model (the identity is the U-Net's files)
    assert prepare(released_config(pipeline / "unet", tmp_path / "runs")) == folder
    diffusion, origin = schedule(tmp_path, pipeline / "unet")
    assert origin.startswith("conf/diffusion/ddpm.yaml") and diffusion.beta_end == 0.02


def test_released_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the data it models"):
        to_evaluate_config(compose("evaluate", [f"released={tmp_path}", "eval=smoke"]))
    with pytest.raises(ConfigError, match="for released= only"):
        to_evaluate_config(compose("evaluate", ["run=/nowhere", "data=shapes"]))
    with pytest.raises(ConfigError, match="name one model"):
        to_evaluate_config(compose("evaluate", ["eval=smoke"]))
    with pytest.raises(ConfigError, match="no such folder"):
        prepare(released_config(tmp_path / "absent", tmp_path / "runs"))
    with pytest.raises(ConfigError, match="no diffusers U-Net"):
        prepare(released_config(tmp_path, tmp_path / "runs"))
    with pytest.raises(ConfigError, match="pass released_tier="):
        to_evaluate_config(
            compose("evaluate", [f"released={tmp_path}", "data=shapes", "eval=base"])
        )
    cfg = to_evaluate_config(
        compose(
            "evaluate",
            [
                f"released={tmp_path}",
                "data=shapes",
                "eval=base",
                "released_tier=quick",
                "released_name=mine",
            ],
        )
    )
    assert (cfg.released_tier, cfg.released_name) == ("quick", "mine")
    with pytest.raises(ConfigError, match="released_name"):
        to_evaluate_config(
            compose("evaluate", [f"released={tmp_path}", "data=shapes", "released_name=a/b"])
        )


def test_the_command_says_what_to_fix(tmp_path: Path) -> None:
    result = run_cli(
        "isodiff.evaluate",
        f"released={tmp_path / 'absent'}",
        "data=shapes",
        "eval=smoke",
        f"run_root={tmp_path / 'runs'}",
    )
    assert result.returncode == 2, result.stderr
    assert "no such folder" in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists()


def test_a_hub_id_in_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """released=<org>/<name>: the cached snapshot, never a download; the same files as a
    folder elsewhere are the same model."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-ddpm" / "snapshots" / ("0" * 40)
    save_model(snapshot / "unet")
    (cache / "models--acme--tiny-ddpm" / "refs").mkdir()
    (cache / "models--acme--tiny-ddpm" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = prepare(released_config("acme/tiny-ddpm", tmp_path / "runs"))
    assert folder.name.startswith("tiny-ddpm-")
    assert read_status(folder)["released"]["source"] == str(snapshot.resolve())
    assert prepare(released_config(snapshot / "unet", tmp_path / "runs")) == folder
    with pytest.raises(ConfigError, match="local Hugging Face cache"):
        prepare(released_config("acme/absent", tmp_path / "runs"))


def _measured(model: Path, runs: Path, tier: str, fid: float) -> Path:
    """The released model's folder at `tier` with a stored fid (as an evaluation leaves)."""
    folder = prepare(released_config(model, runs, f"released_tier={tier}"))
    digest = read_status(folder)["released"]["sha256"]
    (folder / "metrics.json").write_text(
        json.dumps(
            {
                "run": str(folder),
                "metrics": {
                    "fid": {
                        "values": {"fid": fid},
                        "protocol": {"weights": "unet", "weights_sha256": digest},
                    }
                },
            }
        )
    )
    return folder


def test_a_spec_lists_released_models_as_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spec's `released:` rows: the table shows an evaluated one beside the runs (found by
    its files' sha256), and says what is missing of the others (the command to evaluate
    it, or the model not found); the sweep evaluates them with released=."""
    from isodiff.analysis.synthetic import write_runs
    from isodiff.analysis.tables import build_table, to_markdown
    from isodiff.sweep import command as sweep
    from isodiff.sweep.specs import load_spec

    model, later = save_model(tmp_path / "ddpm"), save_model(tmp_path / "later", seed=1)
    text = (Path(__file__).parents[1] / "experiments" / "table_1.yaml").read_text()
    spec_file = tmp_path / "table_1.yaml"
    spec_file.write_text(
        text
        + f"""
released:
  - {{label: released DDPM, model: {model}, dataset: shapes,
     data: [data=shapes, data.resolution=16, data.size=64]}}
  - {{label: not yet, model: {later}, dataset: shapes}}
  - {{label: gone, model: {tmp_path / "gone"}, dataset: shapes}}
  - {{label: other data, model: {model}, dataset: cifar}}
"""
    )
    spec = load_spec(spec_file)
    assert [r.label for r in spec.released_for("quick")] == ["released DDPM", "not yet", "gone"]
    write_runs(tmp_path, spec, "quick")
    _measured(model, tmp_path, "quick", fid=1.25)

    table = build_table(collect_runs(tmp_path / "quick"), spec, "quick")
    assert "shapes: released DDPM" in table.display.index
    row = table.numbers.loc["shapes: released DDPM"]
    assert row["fid_mean"] == 1.25 and row["fid_n"] == 1
    assert len(table.display) == 5  # the four rows of the runs, and the released model
    problems = "\n".join(table.problems)
    assert "released=not yet: not evaluated (python -m isodiff.evaluate released=" in problems
    assert "released=gone: released=" in problems and "no such folder" in problems
    assert "released DDPM" not in problems
    assert "released DDPM" in to_markdown(table, "quick")

    calls: list[list[str]] = []
    monkeypatch.setattr(sweep, "_multirun", lambda module, args: calls.append([module, *args]))
    states = sweep.released_stage(spec, "quick", tmp_path / "quick", ["shapes"], "quick", [])
    assert states == ["done", "not evaluated", "not evaluated"]
    assert calls[0][:5] == [
        "isodiff.evaluate",
        f"released='{model}'",
        "data=shapes",
        "data.resolution=16",
        "data.size=64",
    ]
    assert "released_tier=quick" in calls[0] and calls[1][2] == "data=shapes"
