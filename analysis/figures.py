"""Figure specs + evaluated runs -> PNG and PDF figures, whatever has finished.

    python -m analysis.figures [tier=quick] [run_root=runs] [out=results] [spec ...]

A figure spec names a table spec whose runs it draws (`source`), the kind of plot
(`figure`) and the config keys whose values make one curve each (`rows` of the spec);
curves average the seeds of a setting and show their spread.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.collect import collect_runs  # noqa: E402
from analysis.tables import _label, spec_rows  # noqa: E402
from isodiff.specs import Spec, all_specs, load_spec  # noqa: E402


def curves(df: pd.DataFrame, spec: Spec, tier: str, metric: str, key: str
           ) -> dict[str, list[np.ndarray]]:
    """label -> the array `key` of eval/<metric>.npz of every finished job of that setting."""
    source = load_spec(spec.source)
    rows, _ = spec_rows(df, source, tier)
    found: dict[str, list[np.ndarray]] = {}
    for _, row in rows[rows["state"] == "done"].iterrows():
        path = Path(row["path"]) / "eval" / f"{metric}.npz"
        if path.is_file():
            with np.load(path) as arrays:
                if key in arrays:
                    label = _label(source, [p for p in row["_row"] if p[0] in spec.rows])
                    found.setdefault(label, []).append(arrays[key])
    return found


def _band(ax: plt.Axes, x: np.ndarray, per_run: list[np.ndarray], label: str) -> None:
    """Mean over runs (each run's array averaged over its first axis) with a ±std band."""
    means = np.stack([a.reshape(len(a), -1).mean(axis=0) for a in per_run])
    mean, std = means.mean(axis=0), means.std(axis=0)
    ax.plot(x, mean, marker="o", ms=3, label=f"{label} (n={len(per_run)})")
    if len(per_run) > 1:
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)


def rtl_vs_t(df: pd.DataFrame, spec: Spec, tier: str, ax: plt.Axes) -> bool:
    """Figure 4: RTL at each DDIM timestep (1 = a straight path in h)."""
    rtl, timesteps = curves(df, spec, tier, "rtl", "rtl"), curves(df, spec, tier, "rtl",
                                                                 "timesteps")
    for label, runs in rtl.items():
        _band(ax, timesteps[label][0], runs, label)
    ax.set(xlabel="DDIM timestep t", ylabel="relative trajectory length", xlim=(1000, 0))
    return bool(rtl)


def interp_smoothness(df: pd.DataFrame, spec: Spec, tier: str, ax: plt.Axes) -> bool:
    """Figures 1/5: LPIPS between adjacent frames of slerp interpolations."""
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
    ax.set(xlabel="index, decreasing (all of them when exact; Lanczos: top-k, bottom-k)",
           ylabel="singular value of dh/dx_T", yscale="log")
    return bool(spectra)


PLOTS: dict[str, Callable[[pd.DataFrame, Spec, str, plt.Axes], bool]] = {
    "rtl_vs_t": rtl_vs_t, "interp_smoothness": interp_smoothness,
    "jacobian_spectra": jacobian_spectra}


def render_figure(df: pd.DataFrame, spec: Spec, tier: str, out_dir: Path) -> list[Path]:
    if spec.figure not in PLOTS:
        raise ValueError(f"{spec.name}: figure={spec.figure!r}; known: {', '.join(PLOTS)}")
    fig, ax = plt.subplots(figsize=(6, 4))
    if not PLOTS[spec.figure](df, spec, tier, ax):
        plt.close(fig)
        return []
    ax.set_title(f"{spec.title} ({tier})", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{spec.name}.png", out_dir / f"{spec.name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def render_all(run_root: Path, tier: str, out: Path, names: list[str] | None = None
               ) -> list[Path]:
    df = collect_runs(run_root / tier)
    specs = [load_spec(n) for n in names] if names else all_specs()
    written = []
    for spec in specs:
        if spec.kind == "figure" and not df.empty:
            written += render_figure(df, spec, tier, out / tier / "figures")
    return written


def main(argv: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    names = [a for a in argv if "=" not in a]
    for path in render_all(Path(opts.get("run_root", "runs")), opts.get("tier", "quick"),
                           Path(opts.get("out", "results")), names or None):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
