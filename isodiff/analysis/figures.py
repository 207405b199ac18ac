"""Draw the paper's figures (PNG and PDF) from the runs that have been evaluated.

Examples:
  python -m isodiff.analysis.figures                      # every figure spec, tier=quick
  python -m isodiff.analysis.figures figure_4 tier=smoke run_root=/tmp/runs

Keys: tier= (default quick), run_root= (default runs: the runs are
<run_root>/<tier>/...), out= (default results: pages go to <out>/<tier>/); a spec is
a file experiments/figure_*.yaml (default: all).

A figure spec names a table spec whose runs it draws (`source`), the kind of plot
(`figure`) and the config keys whose values make one curve each (`rows` of the spec);
curves average the seeds of a setting and show their spread. Picture figures (PANELS) show,
per dataset, the images a metric stored for each arm (a row of the spec bar the dataset),
from the arm's run of the lowest training seed.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.axis import Axis  # noqa: E402
from matplotlib.figure import Figure, SubFigure  # noqa: E402

from isodiff import cli  # noqa: E402
from isodiff.analysis.collect import collect_runs  # noqa: E402
from isodiff.analysis.tables import (  # noqa: E402
    _label,
    not_swept,
    refuse_or_list,
    spec_rows,
    sweep_command,
)
from isodiff.evaluate.metrics import lower_is_better  # noqa: E402
from isodiff.runs.files import RunFileError
from isodiff.runs.status import read_metrics  # noqa: E402
from isodiff.sweep.specs import Spec, all_specs, canonical, load_spec  # noqa: E402


def _done(df: pd.DataFrame, spec: Spec, tier: str) -> tuple[Spec, pd.DataFrame]:
    """The figure's source table and its finished jobs (`_row`: a job's row keys)."""
    source = load_spec(spec.source)
    rows, _ = spec_rows(df, source, tier)
    return source, rows[rows["state"] == "done"]


def _array(run_dir: Path, metric: str, key: str) -> np.ndarray | None:
    """The array `key` of <run>/eval/<metric>.npz; None when the run has not stored it."""
    path = run_dir / "eval" / f"{metric}.npz"
    if not path.is_file():
        return None
    with np.load(path) as arrays:
        return arrays.get(key)


def curves(
    df: pd.DataFrame, spec: Spec, tier: str, metric: str, key: str
) -> dict[str, list[np.ndarray]]:
    """label -> the array `key` of eval/<metric>.npz of every finished job of that setting."""
    source, done = _done(df, spec, tier)
    found: dict[str, list[np.ndarray]] = {}
    for _, row in done.iterrows():
        array = _array(Path(row["path"]), metric, key)
        if array is not None:
            label = _label(source, [p for p in row["_row"] if p[0] in spec.rows])
            found.setdefault(label, []).append(array)
    return found


def _band(ax: plt.Axes, x: np.ndarray, per_run: list[np.ndarray], label: str) -> None:
    """Mean over runs (each run's array averaged over its first axis) with a ±std band."""
    means = np.stack([a.reshape(len(a), -1).mean(axis=0) for a in per_run])
    mean, std = means.mean(axis=0), means.std(axis=0)
    ax.plot(x, mean, marker="o", ms=3, label=f"{label} (n={len(per_run)})")
    if len(per_run) > 1:
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)


# The abbreviations the figures use, said on each figure that uses them (a caption line).
GLOSSARY = {
    "lambda_iso": "lambda_iso: the weight of L_iso in the fine-tune's loss (0: the control, a"
    " plain DDPM fine-tune)",
    "scaled": "held-out L_iso scaled: L_iso x min(dim x - 1, dim h), the largest rank dh/dx can"
    " have, so that a scaled isometry scores 1",
    "LPIPS": "LPIPS: learned perceptual distance between two images (0: the same image)",
    "RTL": "RTL: the length in h of a slerp path between two x_T (its DDIM trajectories at"
    " timestep t) over the straight line between its ends (1: straight)",
    "spectrum": "h: the U-Net's mid-block output; a scaled isometry x_T -> h has a flat spectrum"
    " (all its singular values equal)",
    "n": "n: the runs (training seeds) a curve averages; band or bar: +/- 1 s.d. over them",
    "probes": "probes: held-out accuracy or R^2 of a linear (ridge) or kNN read-out of each"
    " generative factor from h, mean over the factors",
    "PR": "participation ratio: the effective rank of h, (sum l)^2 / sum l^2 of its covariance"
    " eigenvalues l",
    "PPL": "PPL: perceptual path length, the perceptual (LPIPS) distance between the samples of"
    " two points eps apart on a slerp in x_T, over eps^2",
    "FID": "FID: Frechet Inception distance of samples to the training data",
    "svm": "v_svm = v(attribute): the normal of a linear SVM that splits generated samples by"
    " the attribute, in x_T; a strength (alpha, a, b) of 1 is one s.d. of their x_T along it",
    "mean": "v_mean = v(attribute): the difference of the class means of generated samples"
    " split by the attribute; a strength of 1 is one s.d. of their codes along it",
    "local": "v_local: a top singular direction of dh/dx_T at the edited sample (no labels)",
    "floor": "dotted: a metric's floor, where it stores one: FID of held-out real images at the"
    " same N; a probe's score on shuffled labels",
}


DIRECTIONS = ("svm", "mean", "local")  # the edit directions GLOSSARY explains


def _caption(fig: Figure, *terms: str) -> None:
    """What the figure's abbreviations mean, a line each beneath its panels (constrained
    layout makes room for it)."""
    per_line = int(fig.get_figwidth() * 19)  # characters of 7 pt text an inch, with a margin
    lines = [line for t in terms for line in textwrap.wrap(GLOSSARY[t], per_line)]
    fig.supxlabel("\n".join(lines), fontsize=7, ha="left", x=0.01, multialignment="left")


def _legend_above(
    ax: plt.Axes, ncols: int = 2, handles: list | None = None, title: str | None = None
) -> None:
    """A legend (of the axes' curves, or `handles`) just above the axes, where it hides no
    curve; `title` heads it in place of the axes' title, which would sit on it (constrained
    layout puts the figure's titles above it)."""
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    if not handles:  # no empty box (strips whose runs stored no curve)
        return
    ax.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.01),
        fontsize=7,
        ncols=min(ncols, len(handles)),
        title=title,
        title_fontsize=9,
    )


def _plain_log(axis: Axis) -> None:
    """Log-axis ticks as plain numbers (0.05, 2, 300), also within a single decade."""
    axis.set_major_locator(ticker.LogLocator(subs=(1, 2, 3, 5)))
    axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(ticker.NullFormatter())


def rtl_vs_t(df: pd.DataFrame, spec: Spec, tier: str, ax: plt.Axes) -> bool:
    """Figure 4: RTL at each DDIM timestep (1 = a straight path in h)."""
    rtl, timesteps = (
        curves(df, spec, tier, "rtl", "rtl"),
        curves(df, spec, tier, "rtl", "timesteps"),
    )
    for label, runs in rtl.items():
        _band(ax, timesteps[label][0], runs, label)
    ax.set(xlabel="DDIM timestep t", ylabel="RTL (relative trajectory length)", xlim=(1020, -20))
    return bool(rtl)


def interp_smoothness(df: pd.DataFrame, spec: Spec, tier: str, ax: plt.Axes) -> bool:
    """Figure 1: LPIPS between adjacent frames of slerp interpolations."""
    adjacent = curves(df, spec, tier, "interp", "slerp_adjacent")
    for label, runs in adjacent.items():
        _band(ax, np.arange(1, runs[0].shape[-1] + 1), runs, label)
    ax.set(xlabel="frame pair (k, k+1)", ylabel="LPIPS between adjacent frames")
    return bool(adjacent)


def jacobian_spectra(df: pd.DataFrame, spec: Spec, tier: str, ax: plt.Axes) -> bool:
    """Singular values of dh/dx_t at t = T (top-k and bottom-k), baseline vs ours."""
    spectra = curves(df, spec, tier, "jacobian", "singular_values_t999")
    for label, runs in spectra.items():
        _band(ax, np.arange(1, runs[0].shape[-1] + 1), runs, label)
    ax.set(
        xlabel="index, decreasing (all of them when exact; Lanczos: top-k, bottom-k)",
        ylabel="singular value of dh/dx_T",
        yscale="log",
    )
    _plain_log(ax.yaxis)
    return bool(spectra)


PLOTS: dict[str, Callable[[pd.DataFrame, Spec, str, plt.Axes], bool]] = {
    "rtl_vs_t": rtl_vs_t,
    "interp_smoothness": interp_smoothness,
    "jacobian_spectra": jacobian_spectra,
}
EXPLAINED = {  # the GLOSSARY terms each PLOTS figure uses
    "rtl_vs_t": ("RTL", "lambda_iso", "n"),
    "interp_smoothness": ("LPIPS", "lambda_iso", "n"),
    "jacobian_spectra": ("spectrum", "lambda_iso", "n"),
}


@dataclass
class Arm:
    """One row of a figure spec within a dataset (e.g. the control) and its finished runs."""

    label: str  # "control (lambda_iso = 0)", "Isometric Diffusion (lambda_iso = 0.1)"
    control: bool
    runs: list[tuple[int, Path]] = field(default_factory=list)  # (training seed, run folder)


def _is_control(source: Spec, pairs: list[tuple[str, object]]) -> bool:
    given = {k: canonical(v) for k, v in pairs}
    return bool(source.control) and all(
        given.get(k) == canonical(v) for k, v in source.control.items()
    )


def _arm_label(source: Spec, pairs: list[tuple[str, object]]) -> str:
    """'control (k = v)' or '<the table's row label> (k = v)' of a row bar the dataset."""
    name = "control" if _is_control(source, pairs) else _label(source, pairs)
    return f"{name} ({', '.join(f'{k} = {v}' for k, v in pairs)})"


def arms(df: pd.DataFrame, spec: Spec, tier: str) -> dict[str, list[Arm]]:
    """dataset -> its arms in the spec's order, each with its runs, lowest training seed
    first."""
    source, done = _done(df, spec, tier)
    found: dict[str, dict[str, Arm]] = {}
    for _, row in done.iterrows():
        pairs = [p for p in row["_row"] if p[0] in spec.rows and p[0] != "data.name"]
        label = _arm_label(source, pairs)
        arm = found.setdefault(dict(row["_row"])["data.name"], {}).setdefault(
            label, Arm(label, _is_control(source, pairs))
        )
        arm.runs.append((int(row["cfg.seed"]), Path(row["path"])))
    for by_label in found.values():
        for arm in by_label.values():
            arm.runs.sort()
    return {dataset: list(by_label.values()) for dataset, by_label in found.items()}


def _shown(arm: Arm, metric: str, key: str) -> tuple[int, Path, np.ndarray] | None:
    """(training seed, run folder, array) of the arm's lowest-seed run that stored `key`."""
    for seed, run_dir in arm.runs:
        if (array := _array(run_dir, metric, key)) is not None:
            return seed, run_dir, array
    return None


def _eval_seed(run_dir: Path, metric: str) -> int | None:
    """The evaluation seed a run's metric was computed with (its samples' x_T)."""
    try:
        record = read_metrics(run_dir, {})
    except RunFileError:
        return None  # the run's problem, listed under its table
    return record.get("metrics", {}).get(metric, {}).get("protocol", {}).get("seed")


def _strip(frames: np.ndarray) -> np.ndarray:
    """(rows, per_row, C, H, W) uint8 images -> one picture in [0, 1] with a row of images
    per row: (H', W') for 1 channel, else (H', W', 3)."""
    rows, per_row = frames.shape[:2]
    import torch  # the figures that need pictures alone load torch

    from isodiff.model.pictures import tile

    images = torch.from_numpy(frames.reshape(rows * per_row, *frames.shape[2:])) / 127.5 - 1
    grid = tile(images, per_row)
    return grid[0].numpy() if frames.shape[2] == 1 else grid.permute(1, 2, 0).numpy()


def _picture(ax: plt.Axes, picture: np.ndarray | None, title: str) -> None:
    """Images a few pixels wide, enlarged pixel by pixel (nearest neighbour)."""
    ax.set_title(title, fontsize=8, loc="left")
    ax.set_xticks([])
    ax.set_yticks([])
    if picture is None:
        ax.text(
            0.5,
            0.5,
            "not stored: evaluate the run again",
            ha="center",
            va="center",
            fontsize=8,
            transform=ax.transAxes,
        )
    elif picture.ndim == 2:
        ax.imshow(picture, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(picture, interpolation="nearest")


def _panels(
    spec: Spec, tier: str, heights: list[float], width: float
) -> tuple[Figure, list[SubFigure]]:
    """A figure titled by the spec with one subfigure a dataset (heights in inches)."""
    fig = plt.figure(figsize=(width, sum(heights) + 0.4), layout="constrained")
    fig.suptitle(f"{spec.title} ({tier})", fontsize=10)
    subfigs = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)
    return fig, list(subfigs.ravel())


def _same_pairs_title(dataset: str, shown: list[tuple[int, Path, np.ndarray]]) -> str:
    """What the strips show, and a warning when the runs' x_T pairs are not the same ones
    (pair i is seeded by (evaluation seed, i))."""
    seeds = sorted({str(_eval_seed(run_dir, "interp")) for _, run_dir, _ in shown})
    pairs = max(len(frames) for _, _, frames in shown)
    if len(seeds) > 1:
        return (
            f"{dataset}: WARNING: the arms' evaluation seeds differ ({', '.join(seeds)}), "
            "so their x_T pairs are not the same"
        )
    return (
        f"{dataset}: slerp between the same x_T pairs 0-{pairs - 1} (evaluation seed "
        f"{seeds[0]}), a pair a row, w = 0 to 1 left to right"
    )


def interp_strips(df: pd.DataFrame, spec: Spec, tier: str) -> Figure | None:
    """Figure 5: per dataset, slerp frames between the same x_T pairs for each arm (its
    lowest training seed) beside the LPIPS between adjacent frames (mean ± std over all
    the arm's seeds)."""
    by_dataset = {
        d: a
        for d, a in arms(df, spec, tier).items()
        if any(_shown(arm, "interp", "slerp_frames") for arm in a)
    }
    if not by_dataset:
        return None
    fig, subfigs = _panels(spec, tier, [2.4 * len(a) + 0.4 for a in by_dataset.values()], 12)
    for subfig, (dataset, dataset_arms) in zip(subfigs, by_dataset.items(), strict=True):
        grid = subfig.add_gridspec(len(dataset_arms), 2, width_ratios=[3, 2])
        curve = subfig.add_subplot(grid[:, 1])
        shown = []
        for i, arm in enumerate(dataset_arms):
            found = _shown(arm, "interp", "slerp_frames")
            shown += [found] if found else []
            _picture(
                subfig.add_subplot(grid[i, 0]),
                _strip(found[2]) if found else None,
                f"{arm.label}, training seed {found[0] if found else '-'}",
            )
            adjacent = [
                a
                for _, run_dir in arm.runs
                if (a := _array(run_dir, "interp", "slerp_adjacent")) is not None
            ]
            if adjacent:
                _band(curve, np.arange(1, adjacent[0].shape[-1] + 1), adjacent, arm.label)
        curve.set(xlabel="frame pair (k, k+1)", ylabel="LPIPS between adjacent frames")
        _legend_above(curve, ncols=1)
        subfig.suptitle(_same_pairs_title(dataset, shown), fontsize=9)
    _caption(fig, "LPIPS", "lambda_iso", "n")
    return fig


def _sources_title(dataset: str, sources: list[np.ndarray], first: str) -> str:
    """What the sources row shows, and a warning when the arms inverted other images."""
    if all(np.array_equal(sources[0], s) for s in sources[1:]):
        return (
            f"{dataset}: DDIM inversion and regeneration of {len(sources[0])} held-out "
            "images, the same for every arm"
        )
    return f"{dataset}: WARNING: the arms' source images differ; shown: those of {first}"


def inversion(df: pd.DataFrame, spec: Spec, tier: str) -> Figure | None:
    """Figure 6: per dataset, held-out source images and their reconstructions by each arm
    (its lowest training seed), the control last."""
    by_dataset = {}
    for dataset, dataset_arms in arms(df, spec, tier).items():
        shown = [
            (arm, found)
            for arm in sorted(dataset_arms, key=lambda a: a.control)
            if (found := _shown(arm, "inversion", "reconstructions"))
        ]
        if shown:
            by_dataset[dataset] = shown
    if not by_dataset:
        return None
    fig, subfigs = _panels(spec, tier, [1.1 * (len(s) + 1) + 0.4 for s in by_dataset.values()], 8)
    for subfig, (dataset, shown) in zip(subfigs, by_dataset.items(), strict=True):
        sources = [_array(run_dir, "inversion", "sources") for _, (_, run_dir, _) in shown]
        axes = subfig.subplots(len(shown) + 1, 1, squeeze=False)[:, 0]
        _picture(axes[0], _strip(sources[0][None]), "held-out sources (test split)")
        for ax, (arm, (seed, _, reconstructions)) in zip(axes[1:], shown, strict=True):
            _picture(
                ax,
                _strip(reconstructions[None]),
                f"{arm.label}: reconstructions, training seed {seed}",
            )
        subfig.suptitle(_sources_title(dataset, sources, shown[0][0].label), fontsize=9)
    _caption(fig, "lambda_iso")
    return fig


def _edit_caption(run_dir: Path, array: str) -> str:
    """What an edit picture shows, from the protocol of the linearity metric that made it."""
    try:
        protocol = read_metrics(run_dir, {})["metrics"]["linearity"]["protocol"]
    except (RunFileError, KeyError):
        return array
    targets = protocol.get("targets_used", [])
    if array.startswith("grid"):
        alphas = ", ".join(f"{a:g}" for a in protocol.get("grid_strengths", []))
        return (
            f"a v({targets[0] if targets else '1st'}) down, b v("
            f"{targets[1] if len(targets) > 1 else '2nd'}) across, a, b = {alphas}"
        )
    alphas = ", ".join(f"{a:g}" for a in protocol.get("strengths", []))
    return f"a sample a row; v({targets[0] if targets else '1st'}), alpha = {alphas}"


def edit_pictures(df: pd.DataFrame, spec: Spec, tier: str) -> Figure | None:
    """Figures 7 and 8: per dataset, the edit images `spec.array` of eval/linearity.npz of
    each arm (its lowest training seed) side by side, the control first; the same x_T in
    every arm (sample i seeded by the evaluation seed and i)."""
    if not spec.array:
        raise ValueError(f"{spec.name}: figure=edit_pictures needs `array` (e.g. strip_xT_svm)")
    by_dataset = {}
    for dataset, dataset_arms in arms(df, spec, tier).items():
        shown = [
            (arm, found)
            for arm in sorted(dataset_arms, key=lambda a: not a.control)
            if (found := _shown(arm, "linearity", spec.array))
        ]
        if shown:
            by_dataset[dataset] = shown
    if not by_dataset:
        return None
    rows = max(found[2].shape[0] for shown in by_dataset.values() for _, found in shown)
    fig, subfigs = _panels(
        spec,
        tier,
        [0.5 * rows + 0.8] * len(by_dataset),
        4.2 * max(len(s) for s in by_dataset.values()),
    )
    for subfig, (dataset, shown) in zip(subfigs, by_dataset.items(), strict=True):
        axes = subfig.subplots(1, len(shown), squeeze=False)[0]
        for ax, (arm, (seed, _, images)) in zip(axes, shown, strict=True):
            _picture(ax, _strip(images), f"{arm.label}, training seed {seed}")
        subfig.suptitle(f"{dataset}: {_edit_caption(shown[0][1][1], spec.array)}", fontsize=9)
    _caption(fig, "lambda_iso", *[d for d in DIRECTIONS if spec.array.endswith(f"_{d}")])
    return fig


def _heldout_curve(run_dir: Path) -> pd.Series | None:
    """step -> liso_heldout of a run's metrics.csv (train.heldout_every); None if it has none."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    if "liso_heldout" not in table:
        return None
    curve = table.dropna(subset=["liso_heldout"]).set_index("step")["liso_heldout"]
    return curve if len(curve) else None


def training_curve(df: pd.DataFrame, spec: Spec, tier: str) -> Figure | None:
    """Held-out L_iso while fine-tuning (metrics.csv), a line per arm (mean ± s.d. over its
    seeds), a panel per dataset: how fast the regulariser acts and where it levels off."""
    source, done = _done(df, spec, tier)
    found: dict[str, dict[str, list[pd.Series]]] = {}
    for _, row in done.iterrows():
        if (curve := _heldout_curve(Path(row["path"]))) is not None:
            label = _arm_label(source, [p for p in row["_row"] if p[0] in spec.rows])
            found.setdefault(row["cfg.data.name"], {}).setdefault(label, []).append(curve)
    if not found:
        return None
    fig, axes = plt.subplots(
        1, len(found), figsize=(4.6 * len(found) + 1, 4.6), squeeze=False, layout="constrained"
    )
    for ax, (dataset, by_arm) in zip(axes[0], found.items(), strict=True):
        for label, curves_ in by_arm.items():
            runs = pd.concat(curves_, axis=1)
            mean, std = runs.mean(axis=1), runs.std(axis=1).fillna(0)
            ax.plot(mean.index, mean, marker="o", ms=2, label=f"{label} (n={len(curves_)})")
            ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2)
        ax.axhline(1, color="grey", lw=0.8, ls=":")  # the best it can be, in view
        ax.set(
            xlabel="fine-tune step",
            yscale="log",
            ylabel="held-out L_iso, scaled (1 = isometry)",
        )
        _plain_log(ax.yaxis)
        _legend_above(ax, ncols=1, title=dataset)
    fig.suptitle(f"{spec.title} ({tier})", fontsize=10)
    _caption(fig, "scaled", "lambda_iso", "n")
    return fig


# A steps_curve metric's axis label and the GLOSSARY term that says what it is.
METRIC_NAMES = {
    "liso_scaled": ("held-out L_iso, scaled", "scaled"),
    "probe_lin_h": ("linear probe on h", "probes"),
    "probe_knn_h": ("kNN probe on h", "probes"),
    "pr_h": ("participation ratio of h", "PR"),
    "ppl_stylegan": ("PPL (StyleGAN's)", "PPL"),
    "fid": ("FID", "FID"),
}


def _metric_label(metric: str, source: Spec) -> str:
    """'<what it is>\n(lower|higher is better)' of a metric value on a figure's axis."""
    lower = source.lower_is_better.get(metric, lower_is_better(metric))
    name = METRIC_NAMES.get(metric, (metric, ""))[0]
    return f"{name}\n({'lower' if lower else 'higher'} is better)"


def _steps_panel(
    ax: plt.Axes, runs: pd.DataFrame, arm_of: list[str], metric: str, colours: dict[str, str]
) -> bool:
    """One metric against train.steps, a line per arm (`arm_of`: each run's) in its colour
    and its floor dotted; whether a floor was drawn."""
    floor = False
    for label, arm in runs.groupby(arm_of, sort=False):
        steps = pd.to_numeric(arm["cfg.train.steps"])
        for column, style in ((metric, "-o"), (f"{metric}_floor", ":_")):
            if column not in arm:
                continue
            stats = (
                pd.to_numeric(arm[column], errors="coerce")
                .groupby(steps)
                .agg(["mean", "std"])
                .dropna(subset=["mean"])
            )
            ax.errorbar(
                stats.index,
                stats["mean"],
                yerr=stats["std"].fillna(0),
                fmt=style,
                ms=4 if style == "-o" else 10,
                capsize=2,
                color=colours[label],
                label=label if style == "-o" else f"{label}: floor",
            )
            floor |= style != "-o"
    return floor


def steps_curve(df: pd.DataFrame, spec: Spec, tier: str) -> Figure | None:
    """Each metric against the fine-tune's length (train.steps), a line per arm (mean ± s.d.
    over seeds), a column per dataset; a metric's permutation floor, where it stores one,
    dotted."""
    source, done = _done(df, spec, tier)
    if done.empty or "cfg.train.steps" not in done:
        return None
    datasets = list(dict.fromkeys(done["cfg.data.name"]))
    fig, axes = plt.subplots(
        len(spec.metrics),
        len(datasets),
        squeeze=False,
        sharex=True,
        figsize=(max(7.0, 3.8 * len(datasets)), 1.8 * len(spec.metrics) + 2.4),
        layout="constrained",
    )
    arms_ = [_arm_label(source, [p for p in pairs if p[0] in spec.rows]) for pairs in done["_row"]]
    # an arm's colour: its place among all arms, the same in every panel
    colours = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(arms_))}
    floor = False
    for col, dataset in enumerate(datasets):
        mask = (done["cfg.data.name"] == dataset).to_numpy()
        runs = done[mask]
        arm_of = [a for a, m in zip(arms_, mask, strict=True) if m]
        lengths = sorted(set(pd.to_numeric(runs["cfg.train.steps"])))
        for row, metric in enumerate(spec.metrics):
            ax = axes[row, col]
            floor |= _steps_panel(ax, runs, arm_of, metric, colours)
            ax.set_xscale("log")
            ax.set_xticks(lengths, [f"{s:g}" for s in lengths])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.set_ylabel(_metric_label(metric, source), fontsize=8)
        axes[-1, col].set_xlabel("fine-tune steps (train.steps)")
        handles = {
            h.get_label(): h for ax in axes[:, col] for h in ax.get_legend_handles_labels()[0]
        }
        title = dataset if len(lengths) > 1 else f"{dataset}: only {lengths[0]:g} steps finished"
        _legend_above(axes[0, col], ncols=1, handles=list(handles.values()), title=title)
    fig.suptitle(f"{spec.title} ({tier})", fontsize=10)
    terms = [METRIC_NAMES[m][1] for m in spec.metrics if m in METRIC_NAMES]
    _caption(fig, "lambda_iso", *dict.fromkeys(terms), *(["floor"] if floor else []))
    return fig


# Picture figures lay out their own panels (a subfigure a dataset); None: nothing to draw.
PANELS: dict[str, Callable[[pd.DataFrame, Spec, str], Figure | None]] = {
    "interp_strips": interp_strips,
    "inversion": inversion,
    "edit_pictures": edit_pictures,
    "steps_curve": steps_curve,
    "training_curve": training_curve,
}


def _plot(df: pd.DataFrame, spec: Spec, tier: str) -> Figure | None:
    """One PLOTS curve plot on a single axes, titled by the spec; None: no curve."""
    fig, ax = plt.subplots(figsize=(7, 5.2), layout="constrained")
    if not PLOTS[spec.figure](df, spec, tier, ax):
        plt.close(fig)
        return None
    fig.suptitle(f"{spec.title} ({tier})", fontsize=10)
    _legend_above(ax)
    _caption(fig, *EXPLAINED[spec.figure])
    return fig


DPI = 150  # of the PNGs


def draw(df: pd.DataFrame, spec: Spec, tier: str) -> Figure | None:
    """The figure of a figure spec; None: nothing to draw yet."""
    if spec.figure in PANELS:
        return PANELS[spec.figure](df, spec, tier)
    if spec.figure in PLOTS:
        return _plot(df, spec, tier)
    raise ValueError(f"{spec.name}: figure={spec.figure!r}; known: {', '.join([*PLOTS, *PANELS])}")


def render_figure(df: pd.DataFrame, spec: Spec, tier: str, out_dir: Path) -> list[Path]:
    fig = draw(df, spec, tier)
    if fig is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{spec.name}.png", out_dir / f"{spec.name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return paths


def render_all(run_root: Path, tier: str, out: Path, names: list[str] | None = None) -> list[Path]:
    """The figures of the named figure specs (default: every one whose table has runs)
    under out/<tier>/; UserError, before any is drawn, when a named one's table has no
    runs; a figure with nothing to draw is said so."""
    root = run_root / tier
    df = collect_runs(root)
    specs = [load_spec(n) for n in names] if names else all_specs()
    specs = [s for s in specs if s.kind == "figure"]
    sources = dict.fromkeys(s.source for s in specs)
    rows = {source: spec_rows(df, load_spec(source), tier)[0] for source in sources}
    absent = {
        s.name: why
        for s in specs
        if (why := not_swept(s.name, s.source, rows[s.source], root, tier))
    }
    refuse_or_list(absent, bool(names), root, tier)
    written = []
    for spec in (s for s in specs if s.name not in absent):
        if not (paths := render_figure(df, spec, tier, out / tier / "figures")):
            print(
                f"{spec.name}: nothing to draw: no done run of {spec.source} stores what it "
                f"draws; `{sweep_command(spec.name, tier, run_root)}` evaluates them"
            )
        written += paths
    return written


def main(argv: list[str]) -> int:
    def work(args: cli.Args) -> int:
        written = render_all(args.run_root, args.tier, args.out, args.names)
        for path in written:
            print(f"wrote {path}")
        drawn = {path.stem for path in written}
        return 1 if args.names and any(n not in drawn for n in args.names) else 0

    return cli.analysis(__doc__, argv, work)


def command() -> None:
    """The `isodiff-figures` console command."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    command()
