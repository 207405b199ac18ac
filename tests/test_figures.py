"""Picture figures (interpolation strips, inversion, edits) and the results landing page,
drawn from synthetic run folders that hold the arrays the metrics store."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

from isodiff.analysis import figures, tables
from isodiff.analysis.collect import collect_runs
from isodiff.analysis.index import write_index
from isodiff.analysis.synthetic import write_runs
from isodiff.model.pictures import save_png
from isodiff.sweep.command import evaluation_metrics
from isodiff.sweep.specs import load_spec
from tests.figure_text import text_problems

PAIRS, FRAMES, KEPT, PX = 3, 11, 8, 16
CONTROL = "control (lambda_iso = 0)"
OURS = "Isometric Diffusion (lambda_iso = 0.1)"


def _job(run_dir: Path) -> tuple[str, int, int]:
    """(dataset, arm: 0 control / 1 ours, training seed) of a synthetic table_1 run."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return cfg["data"]["name"], int(cfg["lambda_iso"] > 0), cfg["seed"]


def _value(arm: int, seed: int, index: int = 0) -> int:
    """The pixel value of every image a run stores: says which run and which image it is."""
    return 50 * seed + 20 * arm + 5 * index


def _channels(dataset: str) -> int:
    return 1 if dataset == "mnist" else 3


def _set_eval_seed(run_dir: Path, metric: str, seed: int) -> None:
    record = json.loads((run_dir / "metrics.json").read_text())
    record["metrics"][metric] = {"values": {}, "protocol": {"seed": seed}}
    (run_dir / "metrics.json").write_text(json.dumps(record))


def _interp_runs(root: Path) -> list[Path]:
    """Table 1's quick jobs (2 datasets x 2 arms x 5 seeds) with eval/interp.npz: frame k of
    pair p of every run is the constant _value(arm, seed, p)."""
    dirs = write_runs(root, load_spec("table_1"), "quick")
    rng = np.random.default_rng(0)
    for d in dirs:
        dataset, arm, seed = _job(d)
        frames = np.stack(
            [
                np.full((FRAMES, _channels(dataset), PX, PX), _value(arm, seed, p), np.uint8)
                for p in range(PAIRS)
            ]
        )
        (d / "eval").mkdir()
        np.savez(
            d / "eval" / "interp.npz",
            slerp_frames=frames,
            slerp_adjacent=rng.random((8, FRAMES - 1)),
        )
        _set_eval_seed(d, "interp", 0)
    return dirs


def _inversion_runs(root: Path) -> list[Path]:
    """Table 1's quick jobs with eval/inversion.npz: the same sources for every run but the
    mnist control (other images), reconstruction i of a run the constant _value(arm, seed, i)."""
    dirs = write_runs(root, load_spec("table_1"), "quick")
    for d in dirs:
        dataset, arm, seed = _job(d)
        c = _channels(dataset)
        sources = np.random.default_rng(int(dataset == "mnist" and arm == 0)).integers(
            0, 256, (KEPT, c, PX, PX), dtype=np.uint8
        )
        reconstructions = np.stack(
            [np.full((c, PX, PX), _value(arm, seed, i), np.uint8) for i in range(KEPT)]
        )
        (d / "eval").mkdir()
        np.savez(d / "eval" / "inversion.npz", sources=sources, reconstructions=reconstructions)
    return dirs


def _linearity_runs(root: Path) -> Path:
    """Table 5's quick jobs with eval/linearity.npz: image (row, column) of a run's strip or
    grid is the constant _value(arm, seed, row) + column; returns the tier's folder."""
    dirs = write_runs(root, load_spec("table_5"), "quick")
    strengths = [-2.0, -1.0, 0.0, 1.0, 2.0]
    for d in dirs:
        dataset, arm, seed = _job(d)
        images = np.stack(
            [
                np.stack(
                    [
                        np.full((_channels(dataset), PX, PX), _value(arm, seed, r) + c, np.uint8)
                        for c in range(5)
                    ]
                )
                for r in range(4)
            ]
        )
        (d / "eval").mkdir()
        np.savez(d / "eval" / "linearity.npz", strip_xT_svm=images, grid_xT_svm=images[:, :4])
        record = json.loads((d / "metrics.json").read_text())
        record["metrics"]["linearity"] = {
            "values": {},
            "protocol": {
                "strengths": strengths,
                "grid_strengths": strengths[:4],
                "targets_used": ["hue", "x"],
            },
        }
        (d / "metrics.json").write_text(json.dumps(record))
    return root / "quick"


def _pictures(fig: Figure) -> list[tuple[str, np.ndarray]]:
    """(title, picture shown) of each picture panel, in drawing order."""
    return [(ax.get_title(loc="left"), ax.images[0].get_array()) for ax in fig.axes if ax.images]


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text)]


def _cell(picture: np.ndarray, row: int, column: int) -> np.ndarray:
    """The centre pixel of image (row, column) of a tile() grid (1 px gaps)."""
    return picture[1 + row * (PX + 1) + PX // 2, 1 + column * (PX + 1) + PX // 2]


def test_picture_figures_are_evaluated_on_table_1_runs() -> None:
    assert {"interp", "inversion"} <= evaluation_metrics(load_spec("table_1"), "quick")


def test_interp_strips_show_the_same_pairs_of_each_arm_beside_all_its_seeds(tmp_path: Path) -> None:
    dirs = _interp_runs(tmp_path)
    shapes_ours_seed0 = next(d for d in dirs if _job(d) == ("shapes", 1, 0))
    (shapes_ours_seed0 / "eval" / "interp.npz").unlink()  # its lowest seed left: seed 1
    mnist_ours = next(d for d in dirs if _job(d) == ("mnist", 1, 0))
    _set_eval_seed(mnist_ours, "interp", 7)
    fig = figures.interp_strips(collect_runs(tmp_path / "quick"), load_spec("figure_5"), "quick")

    strips = _pictures(fig)  # shapes (RGB) first, then mnist (grey)
    assert [title for title, _ in strips] == [
        f"{CONTROL}, training seed 0",
        f"{OURS}, training seed 1",
        f"{CONTROL}, training seed 0",
        f"{OURS}, training seed 0",
    ]
    shown_seed = {
        f"{CONTROL}, training seed 0": (0, 0),
        f"{OURS}, training seed 1": (1, 1),
        f"{OURS}, training seed 0": (1, 0),
    }
    for title, picture in strips:
        assert picture.shape[:2] == (PAIRS * (PX + 1) + 1, FRAMES * (PX + 1) + 1)
        arm, seed = shown_seed[title]
        for p in range(PAIRS):
            for k in (0, FRAMES - 1):
                np.testing.assert_allclose(
                    _cell(picture, p, k), _value(arm, seed, p) / 255, atol=1e-6
                )
    assert [p.ndim for _, p in strips] == [3, 3, 2, 2]

    # the curves: one per arm, the mean over every seed of the per-run mean over pairs
    curve = next(ax for ax in fig.axes if ax.lines)
    assert [line.get_label() for line in curve.lines] == [f"{CONTROL} (n=5)", f"{OURS} (n=4)"]
    expected = np.mean(
        [
            np.load(d / "eval" / "interp.npz")["slerp_adjacent"].mean(axis=0)
            for d in dirs
            if _job(d)[:2] == ("shapes", 0)
        ],
        axis=0,
    )
    np.testing.assert_allclose(curve.lines[0].get_ydata(), expected)

    texts = _texts(fig)
    assert any(
        t.startswith("shapes: slerp between the same x_T pairs 0-2 (evaluation seed 0)")
        for t in texts
    )
    assert any(
        t.startswith("mnist: WARNING: the arms' evaluation seeds differ (0, 7)") for t in texts
    )


def test_interp_strips_and_figure_1_render_to_png(tmp_path: Path) -> None:
    _interp_runs(tmp_path / "runs")
    written = figures.render_all(
        tmp_path / "runs", "quick", tmp_path / "results", ["figure_5", "figure_1", "figure_6"]
    )
    assert sorted(p.name for p in written) == [
        "figure_1.pdf",
        "figure_1.png",
        "figure_5.pdf",
        "figure_5.png",
    ]  # no inversion
    with Image.open(tmp_path / "results/quick/figures/figure_5.png") as image:
        assert min(image.size) > 500


def test_inversion_shows_sources_then_ours_then_the_control(tmp_path: Path) -> None:
    _inversion_runs(tmp_path / "runs")
    fig = figures.inversion(
        collect_runs(tmp_path / "runs" / "quick"), load_spec("figure_6"), "quick"
    )
    shown = _pictures(fig)
    rows = [
        "held-out sources (test split)",
        f"{OURS}: reconstructions, training seed 0",
        f"{CONTROL}: reconstructions, training seed 0",
    ]
    assert [title for title, _ in shown] == rows * 2  # shapes, then mnist
    pictures = [picture for _, picture in shown]
    sources = np.load(next((tmp_path / "runs/quick/shapes").glob("*/eval/inversion.npz")))
    for i in range(KEPT):
        np.testing.assert_allclose(
            _cell(pictures[0], 0, i), sources["sources"][i, :, PX // 2, PX // 2] / 255, atol=1e-6
        )
        np.testing.assert_allclose(_cell(pictures[1], 0, i), _value(1, 0, i) / 255, atol=1e-6)
        np.testing.assert_allclose(_cell(pictures[2], 0, i), _value(0, 0, i) / 255, atol=1e-6)
    assert pictures[0].shape == (PX + 2, KEPT * (PX + 1) + 1, 3) and pictures[3].ndim == 2
    texts = _texts(fig)
    assert any(
        t.startswith(
            "shapes: DDIM inversion and regeneration of 8 held-out images, the same for every arm"
        )
        for t in texts
    )
    assert f"mnist: WARNING: the arms' source images differ; shown: those of {OURS}" in texts
    written = figures.render_all(tmp_path / "runs", "quick", tmp_path / "results", ["figure_6"])
    assert [p.suffix for p in written] == [".png", ".pdf"]


def test_edit_pictures_show_each_arm_side_by_side_control_first(tmp_path: Path) -> None:
    """Figures 7 and 8 from Table 5's runs (_linearity_runs): each panel says whose images it
    holds."""
    df = collect_runs(_linearity_runs(tmp_path / "runs"))
    fig = figures.edit_pictures(df, load_spec("figure_7"), "quick")
    shown = _pictures(fig)
    assert [title for title, _ in shown] == [
        f"{CONTROL}, training seed 0",
        f"{OURS}, training seed 0",
    ] * 2
    for (_, picture), arm in zip(shown, [0, 1, 0, 1], strict=True):
        assert picture.shape[:2] == (4 * (PX + 1) + 1, 5 * (PX + 1) + 1)
        for r in range(4):
            for c in (0, 4):
                np.testing.assert_allclose(
                    _cell(picture, r, c), (_value(arm, 0, r) + c) / 255, atol=1e-6
                )
    texts = _texts(fig)
    assert "shapes: a sample a row; v(hue), alpha = -2, -1, 0, 1, 2" in texts
    grid = figures.edit_pictures(df, load_spec("figure_8"), "quick")
    assert "mnist: a v(hue) down, b v(x) across, a, b = -2, -1, 0, 1" in _texts(grid)
    written = figures.render_all(
        tmp_path / "runs", "quick", tmp_path / "results", ["figure_7", "figure_8"]
    )
    assert sorted(p.name for p in written) == [
        "figure_7.pdf",
        "figure_7.png",
        "figure_8.pdf",
        "figure_8.png",
    ]


def _curve_runs(root: Path) -> None:
    """_interp_runs with the arrays of the curve figures: each run's Jacobian spectrum and
    held-out L_iso curve (metrics.csv)."""
    rng = np.random.default_rng(1)
    for d in _interp_runs(root):
        np.savez(
            d / "eval" / "jacobian.npz",
            singular_values_t999=np.sort(rng.uniform(0.01, 1, (4, 64)))[:, ::-1],
        )
        steps = np.arange(0, 601, 50)
        liso = 1 + 4 * np.exp(-steps / 100) * rng.uniform(0.5, 1.5)
        pd.DataFrame({"step": steps, "liso_heldout": liso}).to_csv(d / "metrics.csv")


def _rtl_runs(root: Path) -> None:
    """Table 4's quick jobs (several regularisers and lambda_iso) with eval/rtl.npz."""
    rng = np.random.default_rng(2)
    for d in write_runs(root, load_spec("table_4"), "quick"):
        (d / "eval").mkdir()
        timesteps = np.arange(900, -1, -100)
        np.savez(d / "eval" / "rtl.npz", rtl=1 + rng.random((4, 10)), timesteps=timesteps)


def _length_runs(root: Path) -> None:
    """The finetune_length jobs (4 lengths), each metric with a floor beside it."""
    for d in write_runs(root, load_spec("finetune_length"), "quick"):
        record = json.loads((d / "metrics.json").read_text())
        for name, metric in record["metrics"].items():
            metric["values"][f"{name}_floor"] = 0.5
        (d / "metrics.json").write_text(json.dumps(record))


# An abbreviation on a figure -> the start of the caption line that has to explain it.
EXPLAINED = {
    "lambda_iso": "lambda_iso: ",
    "LPIPS": "LPIPS: ",
    "RTL": "RTL: ",
    "L_iso, scaled": "held-out L_iso scaled: ",
    "PPL": "PPL: ",
    "FID": "FID: ",
    "participation ratio": "participation ratio: ",
    "probe": "probes: ",
    "v_svm": "v_svm = v(attribute): ",
}


def _one_length_run(root: Path) -> None:
    """The quick tier as it stands: of the finetune_length jobs only Table 1's (shapes, 600
    steps) have finished."""
    _length_runs(root)
    for status in (root / "quick").glob("*/*/status.json"):
        config = yaml.safe_load((status.parent / "config.yaml").read_text())
        if (config["data"]["name"], config["train"]["steps"]) != ("shapes", 600):
            status.write_text(json.dumps({"state": "failed", "error": "not run"}))


READS = {  # test id -> (figure spec, the synthetic runs it draws)
    "figure_1": ("figure_1", _interp_runs),
    "figure_4": ("figure_4", _rtl_runs),
    "figure_5": ("figure_5", _interp_runs),
    "figure_6": ("figure_6", _inversion_runs),
    "figure_7": ("figure_7", _linearity_runs),
    "figure_8": ("figure_8", _linearity_runs),
    "figure_spectra": ("figure_spectra", _curve_runs),
    "figure_training_curve": ("figure_training_curve", _curve_runs),
    "figure_finetune_length": ("figure_finetune_length", _length_runs),
    "figure_finetune_length, one run": ("figure_finetune_length", _one_length_run),
}


@pytest.mark.parametrize("case", sorted(READS))
def test_figures_read_at_a_glance(tmp_path: Path, case: str) -> None:
    """Every figure: no text on other text, on another panel or off the page, no legend on
    the curves, and every abbreviation it uses explained on it."""
    name, runs = READS[case]
    runs(tmp_path)
    fig = figures.draw(collect_runs(tmp_path / "quick"), load_spec(name), "quick")
    assert fig is not None
    assert text_problems(fig, figures.DPI) == []
    caption = fig.get_supxlabel()
    shown = "\n".join(t for t in _texts(fig) if t != caption)
    for term, line in EXPLAINED.items():
        if term in shown:
            assert f"\n{line}" in f"\n{caption}", f"{term} is not explained"
    plt.close(fig)


def _links(page: str) -> list[str]:
    return [unquote(link) for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)]


def test_index_embeds_tables_figures_and_every_evaluated_runs_samples(tmp_path: Path) -> None:
    runs, results = tmp_path / "runs", tmp_path / "results"
    dirs = _interp_runs(runs)
    for d in dirs[:5]:
        save_png(torch.rand(3, 8, 8), d / "samples.png")
    (dirs[-1] / "metrics.json").unlink()  # not evaluated: not on the page
    tables.render_all(runs, "quick", results, ["table_1"])
    figures.render_all(runs, "quick", results, ["figure_1", "figure_5"])
    page = write_index(runs, "quick", results).read_text()

    table = (results / "quick/tables/table_1.md").read_text()
    assert "### table_1: Main comparison" in page
    assert all(line in page for line in table.splitlines() if line.startswith("|"))
    assert "[csv](tables/table_1.csv)" in page
    for name in ("figure_1", "figure_5"):
        title = load_spec(name).title
        assert f"### {name}: {title}\n\n![{title}](figures/{name}.png)" in page

    links = _links(page)
    assert all((results / "quick" / link).is_file() for link in links)
    samples = [link for link in links if link.startswith("samples/")]
    assert len(samples) == 5
    for d in dirs[:5]:
        dataset = _job(d)[0]
        copy = results / "quick" / "samples" / dataset / f"{d.name}.png"
        assert f"samples/{dataset}/{d.name}.png" in samples
        assert copy.read_bytes() == (d / "samples.png").read_bytes()
    missing = [line for line in page.splitlines() if "no samples.png" in line]
    assert sorted(missing) == sorted(
        f"| `{d.name}` | no samples.png in the run folder |" for d in dirs[5:-1]
    )
    assert dirs[-1].name not in page


@pytest.mark.parametrize("made", [False, True])
def test_index_of_a_tier_with_nothing_finished(tmp_path: Path, made: bool) -> None:
    if made:
        (tmp_path / "runs" / "quick").mkdir(parents=True)
    page = write_index(tmp_path / "runs", "quick", tmp_path / "results").read_text()
    assert "No tables yet" in page and "No figures yet" in page
    assert "No evaluated runs" in page and not _links(page)
