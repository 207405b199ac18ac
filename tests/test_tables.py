"""Specs -> tables on synthetic run folders: rows, columns, statistics, missing jobs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from isodiff.analysis.collect import collect_runs
from isodiff.analysis.synthetic import write_runs
from isodiff.analysis.tables import build_table, render_all, to_markdown
from isodiff.errors import ConfigError, UserError
from isodiff.sweep.specs import all_specs, expand, load_spec


@pytest.mark.parametrize("tier", ["smoke", "quick", "paper"])
def test_every_spec_loads_and_expands(tier: str) -> None:
    specs = all_specs()
    assert {s.name for s in specs} >= {
        "table_1",
        "table_2",
        "table_3",
        "table_4",
        "figure_1",
        "figure_4",
        "figure_spectra",
    }
    assert all(load_spec(s.source).kind == "table" for s in specs if s.kind == "figure")
    for spec in (s for s in specs if s.kind == "table"):
        jobs = expand(spec, tier)
        # a spec may have no jobs at a tier (tables 5 and 6 at the paper tier: no labels)
        assert bool(jobs) == bool(spec.datasets_for(tier)), spec.name
        assert len({j.overrides for j in jobs}) == len(jobs)


def test_unknown_spec_and_bad_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known specs: .*table_1"):
        load_spec("table_99")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntitle: y\ngrdi: {}\n")
    with pytest.raises(ConfigError, match="grdi"):
        load_spec(bad)


def test_table_has_one_row_per_setting_and_mean_std_over_seeds(tmp_path: Path) -> None:
    spec = load_spec("table_1")
    dirs = write_runs(tmp_path, spec, "quick")
    table = build_table(collect_runs(tmp_path / "quick"), spec, "quick")
    assert list(table.display.index) == [
        "shapes: DDPM fine-tuned (lambda_iso = 0)",
        "shapes: Isometric Diffusion",
        "mnist: DDPM fine-tuned (lambda_iso = 0)",
        "mnist: Isometric Diffusion",
    ]
    # no paper value transcribed: no column of n/a, one line under the table instead
    assert list(table.display.columns[:2]) == ["liso_scaled", "fid"]
    assert "are not transcribed" in to_markdown(table, "quick")
    # Independent check of one cell: the five seeds of shapes / lambda 0.
    values = [
        json.loads((d / "metrics.json").read_text())["metrics"]["fid"]["values"]["fid"]
        for d in dirs[:5]
    ]
    row = table.numbers.loc["shapes: DDPM fine-tuned (lambda_iso = 0)"]
    assert row["fid_mean"] == pytest.approx(np.mean(values))
    assert row["fid_std"] == pytest.approx(np.std(values, ddof=1))
    assert row["fid_n"] == 5 and not table.problems
    # The best mean is bold within each dataset, never across datasets.
    for dataset in ("shapes", "mnist"):
        rows = table.numbers[table.numbers.index.str.startswith(dataset)]
        bold = table.display.loc[rows.index, "fid"].str.startswith("**")
        assert list(bold[bold].index) == [rows["fid_mean"].idxmin()]
    # one value added to the spec: its metric gets the column, n/a where none is given
    spec.paper = {"shapes: Isometric Diffusion": {"fid": 12.3}}
    table = build_table(collect_runs(tmp_path / "quick"), spec, "quick")
    assert table.display["fid (paper)"].tolist() == ["n/a¹", "12.3", "n/a¹", "n/a¹"]
    assert "liso_scaled (paper)" not in table.display.columns


def test_every_row_carries_the_quality_check_of_its_runs(tmp_path: Path) -> None:
    spec = load_spec("table_1")
    dirs = write_runs(tmp_path, spec, "quick")
    for i, d in enumerate(dirs):
        record = json.loads((d / "metrics.json").read_text())
        # one control seed of shapes generates poorly (FID 5x its floor); mnist's digits all
        # fall in 9 of 10 classes
        heldout = 50.0 if i == 2 else 15.0
        record["metrics"]["fid"]["values"].update(fid_heldout=heldout, fid_floor=10.0)
        record["metrics"]["quality"] = {
            "values": {
                "confident_digit": 0.9,
                "confident_digit_real": 0.95,
                "classes_digit": 9.0 if d.parent.name == "mnist" else 10.0,
                "classes_digit_real": 10.0,
            }
        }
        (d / "metrics.json").write_text(json.dumps(record))
    table = build_table(collect_runs(tmp_path / "quick"), spec, "quick")
    quality = table.display["quality"]
    assert (
        quality["shapes: DDPM fine-tuned (lambda_iso = 0)"]
        == "**fails** (1/5): FID 50 > 3x the real-vs-real floor 10"
    )
    assert quality["shapes: Isometric Diffusion"] == "ok"
    assert (
        quality["mnist: Isometric Diffusion"] == "**fails** (5/5): digit: 9 of 10 classes generated"
    )
    assert table.floors == {"shapes": 10.0, "mnist": 10.0}
    assert "Real-vs-real FID floor at this n: shapes 10, mnist 10." in to_markdown(table, "quick")


def test_failed_and_missing_jobs_are_listed_with_their_reason(tmp_path: Path) -> None:
    spec = load_spec("table_2")  # one seed a row at the smoke tier
    dirs = write_runs(tmp_path, spec, "smoke", fail={1})
    import shutil

    shutil.rmtree(dirs[2])
    table = build_table(collect_runs(tmp_path / "smoke"), spec, "smoke")
    assert len(table.problems) == 2
    assert any("iso.metric=euclidean" in p and "synthetic failure" in p for p in table.problems)
    assert any("iso.metric=spherical" in p and "not run" in p for p in table.problems)
    assert table.display.loc["shapes: G = I (Euclidean)", "fid"] == "–²"
    assert table.display.loc["shapes: no regulariser", "fid"] != "–²"
    markdown = to_markdown(table, "smoke")
    assert "missing: " in markdown and "synthetic failure" in markdown


def test_render_all_writes_markdown_latex_csv(tmp_path: Path) -> None:
    for name in ("table_1", "table_3"):
        write_runs(tmp_path / "runs", load_spec(name), "smoke", rng_seed=len(name))
    written = render_all(tmp_path / "runs", "smoke", tmp_path / "results", ["table_1", "table_3"])
    assert sorted(p.name for p in written) == sorted(
        f"table_{i}.{ext}" for i in (1, 3) for ext in ("md", "tex", "csv")
    )
    assert "\\textbf" in (tmp_path / "results/smoke/tables/table_1.tex").read_text()


def test_figures_draw_one_curve_per_setting(tmp_path: Path) -> None:
    from isodiff.analysis.figures import curves
    from isodiff.analysis.figures import render_all as render_figures

    dirs = write_runs(tmp_path / "runs", load_spec("table_4"), "smoke")
    rng = np.random.default_rng(0)
    for d in dirs:
        (d / "eval").mkdir()
        np.savez(
            d / "eval" / "rtl.npz", rtl=1 + rng.random((4, 3)), timesteps=np.array([999, 666, 333])
        )
    df = collect_runs(tmp_path / "runs" / "smoke")
    found = curves(df, load_spec("figure_4"), "smoke", "rtl", "rtl")
    # one curve per (iso.metric, lambda_iso): spherical, path_length, smooth_diffusion x 3
    assert len(found) == 9 and all(len(v) == 1 for v in found.values())
    written = render_figures(tmp_path / "runs", "smoke", tmp_path / "results", ["figure_4"])
    assert [p.suffix for p in written] == [".png", ".pdf"] and written[0].stat().st_size > 0
    with pytest.raises(UserError, match=r"figure_1 \(it shows table_1.s runs\): no runs under"):
        render_figures(tmp_path / "runs", "smoke", tmp_path / "results", ["figure_1"])


def test_paired_differences_from_the_control_by_seed(tmp_path: Path) -> None:
    spec = load_spec("table_1")  # control: lambda_iso = 0; 5 seeds per dataset
    dirs = write_runs(tmp_path, spec, "quick", fail={11})  # mnist, lambda 0, seed 1
    table = build_table(collect_runs(tmp_path / "quick"), spec, "quick")
    assert list(table.paired.index) == ["shapes: Isometric Diffusion", "mnist: Isometric Diffusion"]

    def fid(d: Path) -> float:
        return json.loads((d / "metrics.json").read_text())["metrics"]["fid"]["values"]["fid"]

    # expand order: shapes (lambda 0: seeds 0-4, lambda 0.1: seeds 0-4), then mnist
    diffs = [fid(dirs[5 + s]) - fid(dirs[s]) for s in range(5)]
    mean, se = np.mean(diffs), np.std(diffs, ddof=1) / np.sqrt(5)
    assert table.paired.loc["shapes: Isometric Diffusion", "fid"] == f"{mean:+.3g} ± {se:.2g} (n=5)"
    # the mnist pair of seed 1 has no control: four pairs remain
    assert table.paired.loc["mnist: Isometric Diffusion", "fid"].endswith("(n=4)")
    assert "Paired difference from the control (lambda_iso = 0)" in to_markdown(table, "quick")


def test_floors_and_ceilings_stand_beside_their_values(tmp_path: Path) -> None:
    spec = load_spec("table_6")
    dirs = write_runs(tmp_path, spec, "quick")
    floors = {}
    for d in dirs:  # the control's value sits on its floor; ours is 10 s.d. above it
        record = json.loads((d / "metrics.json").read_text())
        values = record["metrics"]["probe_lin_h"]["values"]
        control = "lambda_iso: 0\n" in (d / "config.yaml").read_text()
        floor = values["probe_lin_h"] - (0.0 if control else 0.5)
        values.update(
            {
                "probe_lin_h_floor": floor,
                "probe_lin_h_floor_sd": 0.05,
                "probe_lin_h_ceiling": 3.0,
                "probe_lin_h_ceiling_rot": 2.5,
            }
        )
        floors.setdefault(control, []).append(floor)
        (d / "metrics.json").write_text(json.dumps(record))
    table = build_table(collect_runs(tmp_path / "quick"), spec, "quick")
    control, ours = "shapes: DDPM fine-tuned (lambda_iso = 0)", "shapes: Isometric Diffusion"
    cells = table.display["probe_lin_h floor"]
    assert cells[control].endswith("³") and not cells[ours].endswith("³")
    assert cells[ours] == f"{np.mean(floors[False]):.3g} ± 0.05"
    assert (table.display["probe_lin_h ceiling"] == "3 / 2.5").all()
    assert table.numbers.loc[ours, "probe_lin_h_floor"] == pytest.approx(np.mean(floors[False]))
    assert "dci_d_h floor" not in table.display  # no floor stored: no column
    markdown = to_markdown(table, "quick")
    assert "³ within 2 s.d. of its permutation floor" in markdown


def test_paired_differences_skip_jobs_that_have_not_run(tmp_path: Path) -> None:
    """Several planned jobs of one arm missing (an on-demand spec half run) pair with
    nothing; the finished pairs keep their differences."""
    import shutil

    spec = load_spec("table_1")
    dirs = write_runs(tmp_path, spec, "quick")
    for d in dirs[3:5] + dirs[8:10]:  # shapes seeds 3 and 4 of both arms
        shutil.rmtree(d)
    table = build_table(collect_runs(tmp_path / "quick"), spec, "quick")
    assert table.paired is not None
    assert table.paired.loc["shapes: Isometric Diffusion", "fid"].endswith("(n=3)")
    assert table.paired.loc["mnist: Isometric Diffusion", "fid"].endswith("(n=5)")
