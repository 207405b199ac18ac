"""Train, check and export the tier's base models (one per dataset) that sweeps fine-tune.

Examples:
  python -m isodiff.sweep.bases tier=smoke out=/tmp/bases
  python -m isodiff.sweep.bases tier=quick verify=isodiff/pretrained/quick   # `make bases`

Keys: tier= (default quick), out= (default runs/<tier>/bases), verify=<a bases folder>;
any other key=value is a training override, e.g. run_root=runs or cluster=slurm_local
(python -m isodiff.train --cfg job lists them).

As the paper starts from google/ddpm-ema-celebahq-256: trained with the tier's recipe
(conf/tier/<tier>.yaml and conf/recipe/<tier>_base.yaml), evaluated on the quality check
(eval=base: FID of 1,000 samples against held-out images beside the real-vs-real floor,
classifier confidence and class coverage), and exported to `out/<dataset>/` as diffusers
UNet2DModel folders of the EMA weights, with `out/manifest.json`: the command and commit,
device, package versions, config hash, sha256 of every file, training time and the quality
figures. isodiff ships the quick tier's bases in isodiff/pretrained/quick; `verify=`
compares with them: bitwise (sha256) where device and torch match the manifest's, the
quality check otherwise. Exit 1 when a base fails its quality check or the verification.
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from isodiff import cli
from isodiff.config import BaseSource, tier_config
from isodiff.errors import ConfigError, UserError
from isodiff.evaluate.metrics.quality import check
from isodiff.runs.files import atomic_write_json, file_hashes, read_json
from isodiff.runs.identity import provenance, signature
from isodiff.runs.status import (
    BASES_MANIFEST,
    bases_manifest_problem,
    is_done,
    read_metrics,
    read_status,
)
from isodiff.sweep import plan
from isodiff.sweep.command import LAUNCHER_KEYS, base_stage, evaluate_stage
from isodiff.sweep.specs import all_specs

log = logging.getLogger("isodiff.sweep.bases")
MANIFEST = BASES_MANIFEST
QUALITY_METRICS = ("fid", "quality")


def training_seconds(run_dir: Path) -> float:
    """Time of the training loop from metrics.csv (each row: steps since the last row at
    steps_per_s), over every attempt of a resumed job."""
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    seconds, last = 0.0, 0
    for row in rows:
        if not row["steps_per_s"]:  # a row of held-out L_iso alone (step 0)
            continue
        step = int(row["step"])
        seconds += (step - last) / float(row["steps_per_s"])
        last = step
    return seconds


def export(run_dir: Path, dest: Path) -> None:
    """The run's EMA U-Net as a plain diffusers UNet2DModel folder (safetensors), loadable by
    UNet2DModel.from_pretrained without isodiff (a DiT's: DiTTransformer2DModel)."""
    from isodiff.model.unet import load_unet

    unet = load_unet(str(run_dir), ema=True)
    # the diffusers class HUNet (HDiT) extends: UNet2DModel (DiTTransformer2DModel)
    plain = next(
        c for c in type(unet).__mro__ if c.__module__.startswith("diffusers.")
    ).from_config(unet.config)
    plain.load_state_dict(unet.state_dict())
    shutil.rmtree(dest, ignore_errors=True)
    plain.save_pretrained(dest)
    if (run_dir / "samples.png").is_file():
        shutil.copy2(run_dir / "samples.png", dest / "samples.png")


def quality_of(run_dir: Path) -> dict[str, Any]:
    """The base's quality figures (eval=base) and the check's verdict."""
    record = read_metrics(run_dir) or {"metrics": {}}  # RunFileError: wrong shape
    values: dict[str, float] = {}
    protocol: dict[str, Any] = {}
    for name in QUALITY_METRICS:
        entry = record["metrics"].get(name, {})
        values.update(entry.get("values", {}))
        protocol[name] = entry.get("protocol")
    histograms = {}
    arrays = run_dir / "eval" / "quality.npz"
    if arrays.is_file():
        with np.load(arrays) as a:
            histograms = {k: a[k].tolist() for k in a.files}
    reasons = check(values)
    return {
        "values": values,
        "histograms": histograms,
        "passed": not reasons,
        "reasons": reasons,
        "protocol": protocol,
    }


def describe(
    tier: str,
    datasets: list[str],
    bases: dict[str, Path],
    overrides: dict[str, list[str]],
    out: Path,
    command: list[str],
) -> dict[str, Any]:
    """manifest.json: how the bases were made, what they are, how good they are."""
    import torch  # the device and version that made them

    entries = {}
    for dataset in datasets:
        run_dir = bases[dataset]
        status = read_status(run_dir) or {}
        entries[dataset] = {
            "job": run_dir.name,
            "config_hash": signature(run_dir),
            "trained_at_commit": status.get("git"),
            "train_overrides": overrides[dataset],
            # what fine-tunes must match (isodiff.model.unet.require_objective)
            "diffusion": OmegaConf.to_container(
                OmegaConf.load(run_dir / "config.yaml").diffusion, resolve=True
            ),
            "steps": status.get("step"),
            "final_mse": status.get("final_mse"),
            "training_seconds": round(training_seconds(run_dir), 1),
            "files": file_hashes(out / dataset),
            "quality": quality_of(run_dir),
        }
    made_by = provenance()
    return {
        "tier": tier,
        "command": command,
        "git": made_by["git"],
        "device": "cuda:" + torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()})",
        # torch's own version names its build (+cu130, +cpu): bitwise needs the same
        "packages": {**made_by["packages"], "torch": torch.__version__},
        "bases": entries,
    }


def compare(made: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Differences of a retrained manifest from the shipped one: sha256 where device and
    torch agree (bitwise reproducibility), the quality check otherwise."""
    same_platform = (
        made["device"] == reference["device"]
        and made["packages"]["torch"] == reference["packages"]["torch"]
    )
    problems = []
    for dataset, entry in reference["bases"].items():
        ours = made["bases"].get(dataset)
        if ours is None:
            problems.append(f"{dataset}: not retrained")
        elif same_platform:
            if differ := sorted(
                k for k in entry["files"] if ours["files"].get(k) != entry["files"][k]
            ):
                problems.append(
                    f"{dataset}: not bitwise equal to the shipped base ({', '.join(differ)})"
                )
        elif not ours["quality"]["passed"]:
            problems.append(
                f"{dataset}: fails the quality check: " + "; ".join(ours["quality"]["reasons"])
            )
    return problems


def datasets_of(tier: str) -> list[str]:
    """Every dataset a table spec uses at this tier."""
    return list(
        dict.fromkeys(d for s in all_specs() if s.kind == "table" for d in s.datasets_for(tier))
    )


def make_bases(tier: str, out: Path, extra: list[str], command: list[str]) -> dict[str, Any]:
    """Train (or resume; a done base is not retrained), evaluate and export every base of the
    tier; returns the manifest written to out/manifest.json."""
    settings = tier_config(tier)
    if settings.bases == BaseSource.given:
        raise ConfigError(
            f"tier={tier} pretrains no base (tier.bases: given in "
            f"conf/tier/{tier}.yaml): bring a checkpoint with init_from="
        )
    datasets = datasets_of(tier)
    bases = base_stage(datasets, tier, extra)
    if failed := [d for d, path in bases.items() if not is_done(path)]:
        raise UserError(
            f"base training failed for {failed}: see status.json in "
            + ", ".join(str(bases[d]) for d in failed)
        )
    launch = [a for a in extra if a.startswith(LAUNCHER_KEYS)]
    evaluate_stage(
        {path: set(QUALITY_METRICS) for path in bases.values()}, settings.base_eval, launch
    )
    for dataset, run_dir in bases.items():
        export(run_dir, out / dataset)
    overrides = {d: plan.base_overrides(d, tier, extra) for d in datasets}
    manifest = describe(tier, datasets, bases, overrides, out, command)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    return cli.run(__doc__, argv, _bases)


def _bases(argv: list[str]) -> int:
    got = cli.parse_options(argv, ("tier", "out", "verify"), overrides=True, names=False)
    tier = got.values.get("tier", "quick")
    out = Path(got.values.get("out", f"runs/{tier}/bases"))
    verify = got.values.get("verify")
    # the reference first: a damaged one stops the command before any training
    reference = read_json(Path(verify) / MANIFEST, shape=bases_manifest_problem) if verify else None
    if verify and reference is None:
        raise ConfigError(f"verify={verify}: no {MANIFEST} there")
    manifest = make_bases(tier, out, got.overrides, ["python", "-m", "isodiff.sweep.bases", *argv])
    status = 0
    for dataset, entry in manifest["bases"].items():
        q = entry["quality"]
        log.info(
            "%s: %s (%s)",
            dataset,
            "passes the quality check"
            if q["passed"]
            else "FAILS the quality check: " + "; ".join(q["reasons"]),
            json.dumps({k: round(v, 4) for k, v in q["values"].items()}),
        )
        status |= not q["passed"]
    if reference is not None:
        problems = compare(manifest, reference)
        for problem in problems:
            log.error("verify: %s", problem)
        if not problems:
            log.info("verify: every base matches %s", Path(verify) / MANIFEST)
        status |= bool(problems)
    log.info("bases and %s written to %s", MANIFEST, out)
    return int(status)


def command() -> None:
    """The `isodiff-bases` console command."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    command()
