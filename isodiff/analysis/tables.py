"""Write the paper's tables (Markdown, LaTeX, CSV) from the runs that have finished.

Examples:
  python -m isodiff.analysis.tables                       # every table spec, tier=quick
  python -m isodiff.analysis.tables table_1 tier=smoke run_root=/tmp/runs

Keys: tier= (default quick), run_root= (default runs: the runs are
<run_root>/<tier>/...), out= (default results: pages go to <out>/<tier>/); a spec is
a file of experiments/ (table_1 ... table_7; default: all).

A cell is the mean ± std over seeds (n < expected seeds is footnoted); the best mean of each
metric within a dataset is bold; the paper's value stands beside ours ("n/a" until
transcribed); a metric that stores its permutation floor and ceiling
(isodiff.evaluate.metrics.calibration) has them in columns beside it, and a value within its
floor's spread is marked; jobs that failed or have not run are listed under the table with
their reason. Every row carries the quality check of its runs
(isodiff.evaluate.metrics.quality: does the model generate?) and the table states each
dataset's real-vs-real FID floor: a metric of a model that does not generate is not a result.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from isodiff import cli
from isodiff.analysis.collect import collect_runs
from isodiff.errors import UserError
from isodiff.evaluate.metrics import lower_is_better
from isodiff.evaluate.metrics.calibration import FLOOR_SDS, within_floor
from isodiff.evaluate.metrics.quality import check
from isodiff.sweep.command import plan_for
from isodiff.sweep.plan import plan_path
from isodiff.sweep.specs import Spec, all_specs, canonical, load_spec


@dataclass
class Table:
    """A rendered spec: numbers (for CSV) and display strings (for Markdown/LaTeX)."""

    spec: Spec
    numbers: pd.DataFrame  # one row per table row: <metric>_mean, _std, _n
    display: pd.DataFrame  # the same rows as strings, with the paper columns
    problems: list[str] = field(default_factory=list)
    paired: pd.DataFrame | None = None  # spec.control: differences from it, as strings
    floors: dict[str, float] = field(default_factory=dict)  # dataset -> real-vs-real FID
    rows: pd.DataFrame | None = None  # spec_rows: its planned jobs, as collected


def _key(pairs: list[tuple[str, object]]) -> str:
    return ",".join(f"{k}={canonical(v)}" for k, v in pairs)


def _label(spec: Spec, pairs: list[tuple[str, object]]) -> str:
    """The spec's label for a row: the first row_labels entry all of whose pairs hold."""
    given = {k: canonical(v) for k, v in pairs}
    dataset = dict(pairs).get("data.name")
    rest = [(k, v) for k, v in pairs if k != "data.name"]
    for key, label in spec.row_labels.items():
        wanted = dict(item.split("=", 1) for item in key.split(","))
        if all(given.get(k) == canonical(v) for k, v in wanted.items()):
            return f"{dataset}: {label}" if dataset else label
    return f"{dataset}: {_key(rest)}" if dataset else _key(rest)


def spec_rows(
    df: pd.DataFrame, spec: Spec, tier: str, released: bool = True
) -> tuple[pd.DataFrame, list[str]]:
    """The collected jobs of a spec, one row per job of its plan (the folder the plan names,
    never a folder that merely holds the same values; `_dataset` and `_point` its dataset and
    grid values as planned), and the problems: planned jobs that failed, are missing, or
    whose files are unreadable (or of the wrong shape) or stale, and metrics that failed
    outside the run (said so). released: with the spec's released models (`released_rows`;
    `_given_label` their label), which claims leave out (they pair runs by grid point)."""
    planned = plan_for(spec, tier, Path(df.attrs["root"])).finetunes()
    expected = [
        {
            "_job": job.folder,
            "_dataset": job.dataset,
            "_point": job.point,
            "_name": ",".join([f"data={job.dataset}", *(f"{k}={v}" for k, v in job.point.items())]),
            "_row": [
                ("data.name", job.dataset),
                *((k, job.point[k]) for k in spec.rows if k != "data.name"),
            ],
        }
        for job in planned
    ]
    models, problems = released_rows(spec, tier, Path(df.attrs["root"])) if released else ([], [])
    expected += models
    found = pd.DataFrame(columns=["_job"])
    if not df.empty:
        found = df.assign(_job=["/".join(Path(p).parts[-2:]) for p in df["path"]])
    columns = ["_job", "_dataset", "_point", "_name", "_row", "_given_label"]
    merged = pd.DataFrame(expected, columns=columns).merge(found, on="_job", how="left")
    for _, row in merged.iterrows():
        state, problem = row.get("state"), row.get("problem")
        if state != "done":
            reason = row.get("error") if state in ("failed", "unreadable") else state
            problems.append(f"{row['_name']}: {reason if isinstance(reason, str) else 'not run'}")
        elif isinstance(problem, str):
            problems.append(f"{row['_name']}: {problem}")
        if state == "done" and isinstance(environment := row.get("environment"), str):
            problems.append(f"{row['_name']}: {environment}")  # the machine's, not the run's
    return merged, problems


def sweep_command(name: str, tier: str, run_root: Path) -> str:
    """The sweep that makes (and evaluates) a spec's runs, as a user types it."""
    where = "" if run_root == Path("runs") else f" run_root={run_root}"
    return f"python -m isodiff.sweep {name} tier={tier}{where}"


def not_swept(name: str, source: str, rows: pd.DataFrame, root: Path, tier: str) -> str | None:
    """Why spec `name` has nothing to show: none of the planned jobs of `source` (the table
    whose runs it shows: spec_rows) has run, and the sweep that runs them; None when some has.
    root: the tier's folder."""
    if "state" in rows and rows["state"].notna().any():
        return None
    plan = plan_path(root, source)
    why = (
        f"none of the {len(rows)} jobs of {plan} has run"
        if plan.is_file()
        else f"no runs under {root} (no sweep of {source} has written {plan})"
    )
    of = "" if name == source else f" (it shows {source}'s runs)"
    return f"{name}{of}: {why}; run `{sweep_command(name, tier, root.parent)}`"


def refuse_or_list(absent: dict[str, str], requested: bool, root: Path, tier: str) -> None:
    """Specs with nothing to show: an error (UserError, before anything is written) when
    the user named them, else one line that lists them and the sweep that makes them."""
    if absent and requested:
        raise UserError("; ".join(absent.values()))
    if absent:
        print(
            f"no runs yet under {root} for {', '.join(absent)}: "
            f"`{sweep_command('<spec>', tier, root.parent)}` makes them"
        )


def released_rows(spec: Spec, tier: str, root: Path) -> tuple[list[dict], list[str]]:
    """The spec's released models at this tier as expected rows (their folders found by
    their files' sha256: isodiff.evaluate.released), and those that cannot be shown: the
    model is not on this machine, or has not been evaluated (with the command that does)."""
    if not spec.released_for(tier):
        return [], []
    from isodiff.errors import ConfigError
    from isodiff.evaluate.released import EXPERIMENT, folder_of  # (loads torch)

    rows, problems = [], []
    for row in spec.released_for(tier):
        name = f"data={row.dataset},released={row.label}"
        try:
            folder = folder_of(row.model, root)
        except ConfigError as err:
            problems.append(f"{name}: {err}")
            continue
        if folder is None:
            problems.append(
                f"{name}: not evaluated (python -m isodiff.evaluate released="
                f"{row.model} {' '.join(row.data_overrides())} "
                f"released_tier={tier} run_root={root.parent})"
            )
            continue
        rows.append(
            {
                "_job": f"{EXPERIMENT}/{folder.name}",
                "_dataset": row.dataset,
                "_point": {},
                "_name": name,
                "_row": [("data.name", row.dataset)],
                "_given_label": f"{row.dataset}: {row.label}",
            }
        )
    return rows, problems


def build_table(df: pd.DataFrame, spec: Spec, tier: str) -> Table:
    merged, problems = spec_rows(df, spec, tier)
    merged["_label"] = [
        given if isinstance(given, str) else _label(spec, pairs)
        for given, pairs in zip(merged["_given_label"], merged["_row"], strict=True)
    ]
    order = list(dict.fromkeys(merged["_label"]))
    numbers = pd.DataFrame(index=pd.Index(order, name="row"))
    display = pd.DataFrame(index=pd.Index(order, name="row"))
    per_row = merged.groupby("_label", sort=False).size()
    dataset = (
        merged.groupby("_label", sort=False)["_row"]
        .first()
        .map(lambda pairs: dict(pairs)["data.name"])
    )
    for metric in spec.metrics_for(tier):
        values = merged[["_label"]].assign(
            v=pd.to_numeric(
                merged.get(metric, pd.Series(np.nan, index=merged.index)), errors="coerce"
            )
        )
        stats = values.groupby("_label", sort=False)["v"].agg(["mean", "std", "count"])
        numbers[[f"{metric}_mean", f"{metric}_std", f"{metric}_n"]] = stats.to_numpy()
        means = stats["mean"].groupby(dataset)
        lower = spec.lower_is_better.get(metric, lower_is_better(metric))
        best = means.transform("min" if lower else "max")  # within each dataset
        display[metric] = [
            _cell(m, s, int(n), int(per_row[label]), m == best[label])
            for label, (m, s, n) in stats.iterrows()
        ]
        for companion in ("floor", "floor_sd", "ceiling", "ceiling_rot"):
            if f"{metric}_floor_sd" in merged and f"{metric}_{companion}" in merged:
                numbers[f"{metric}_{companion}"] = _row_means(merged, f"{metric}_{companion}")
        references = reference_columns(merged, metric, stats["mean"])
        for column, cells in references.items():
            display[column] = cells
        paper = [spec.paper.get(label, {}).get(metric) for label in order]
        # a column of the paper's values once the spec holds one (`paper:`); none transcribed,
        # one line under the table says so instead of a column of n/a
        if any(v is not None for v in paper):
            display[f"{metric} (paper)"] = ["n/a¹" if v is None else f"{v:g}" for v in paper]
    display["quality"] = quality_cells(merged, order)
    floor = pd.to_numeric(
        merged.get("fid_floor", pd.Series(np.nan, index=merged.index)), errors="coerce"
    )
    floors = floor.groupby(merged["_label"].map(dataset), sort=False).mean()
    return Table(
        spec,
        numbers,
        display,
        problems,
        paired_differences(merged, spec, tier),
        floors.dropna().to_dict(),
        merged,
    )


def _row_means(merged: pd.DataFrame, column: str) -> pd.Series:
    values = pd.to_numeric(
        merged.get(column, pd.Series(np.nan, index=merged.index)), errors="coerce"
    )
    return values.groupby(merged["_label"], sort=False).mean()


def reference_columns(merged: pd.DataFrame, metric: str, means: pd.Series) -> dict[str, list[str]]:
    """The references a metric stored beside its value (isodiff.evaluate.metrics.calibration), as
    display columns: "<metric> floor" (the permutation floor, mean ± its s.d., averaged over
    the row's runs) and "<metric> ceiling" (planted code / it rotated). A row whose mean lies
    within FLOOR_SDS s.d. of its floor is marked ³ in the floor column: not told apart
    from no information."""
    columns = {}
    floor, spread = _row_means(merged, f"{metric}_floor"), _row_means(merged, f"{metric}_floor_sd")
    # A floor is a permutation floor only with its s.d. (fid_floor is FID's real-vs-real one).
    if floor.notna().any() and spread.notna().any():
        cells = []
        for label, f in floor.items():
            if pd.isna(f):
                cells.append("–")
                continue
            mark = "³" if within_floor(means[label], f, spread[label]) else ""
            cells.append(f"{f:.3g} ± {spread[label]:.2g}{mark}")
        columns[f"{metric} floor"] = cells
    ceiling = _row_means(merged, f"{metric}_ceiling")
    rotated = _row_means(merged, f"{metric}_ceiling_rot")
    if ceiling.notna().any():
        columns[f"{metric} ceiling"] = [
            "–" if pd.isna(c) else f"{c:.3g} / {r:.3g}"
            for c, r in zip(ceiling, rotated, strict=True)
        ]
    return columns


QUALITY_PREFIXES = ("fid_heldout", "fid_floor", "confident_", "classes_")


def quality_cells(merged: pd.DataFrame, order: list[str]) -> list[str]:
    """Per row: "ok" when every finished run passes the quality check, else how many fail
    and the first run's reasons."""
    columns = [c for c in merged.columns if c.startswith(QUALITY_PREFIXES)]
    verdicts: dict[str, list[list[str]]] = {}
    for _, run in merged[merged["state"] == "done"].iterrows() if "state" in merged else []:
        values = {c: float(run[c]) for c in columns if pd.notna(run[c])}
        verdicts.setdefault(run["_label"], []).append(check(values))
    cells = []
    for label in order:
        runs = verdicts.get(label, [])
        failing = [r for r in runs if r]
        if not runs:
            cells.append("–")
        elif not failing:
            cells.append("ok")
        else:
            cells.append(f"**fails** ({len(failing)}/{len(runs)}): {'; '.join(failing[0])}")
    return cells


def paired_differences(merged: pd.DataFrame, spec: Spec, tier: str) -> pd.DataFrame | None:
    """Each non-control row minus the control job of the same seed and other row keys:
    mean ± standard error over the pairs (n), per metric. Pairing removes what a seed
    shares between the two runs (data order, noise), so small effects become visible."""
    if not spec.control or "cfg.seed" not in merged:
        return None
    control = {k: canonical(v) for k, v in spec.control.items()}

    def split(pairs: list[tuple[str, object]]) -> tuple[bool, str]:
        is_control = all(canonical(v) == control[k] for k, v in pairs if k in control)
        return is_control, _key([(k, v) for k, v in pairs if k not in control])

    keys = [split(pairs) for pairs in merged["_row"]]
    metrics = [m for m in spec.metrics_for(tier) if m in merged]
    frame = merged.assign(_control=[c for c, _ in keys], _rest=[r for _, r in keys])
    frame = frame[frame["cfg.seed"].notna()]  # a job not run yet pairs with nothing
    frame[metrics] = frame[metrics].apply(pd.to_numeric, errors="coerce")
    frame = frame.set_index(["_rest", "cfg.seed"])
    base = frame.loc[frame["_control"], metrics]
    rows = {}
    for label, group in frame[~frame["_control"]].groupby("_label", sort=False):
        diff = group[metrics] - base.reindex(group.index)
        rows[label] = [_paired_cell(diff[m].dropna()) for m in metrics]
    return pd.DataFrame.from_dict(rows, orient="index", columns=metrics) if rows else None


def _paired_cell(d: pd.Series) -> str:
    if len(d) == 0:
        return "–"
    if len(d) == 1:
        return f"{d.iloc[0]:+.3g} (n=1)"
    return f"{d.mean():+.3g} ± {d.std(ddof=1) / np.sqrt(len(d)):.2g} (n={len(d)})"


def _cell(mean: float, std: float, n: int, expected: int, best: bool) -> str:
    if n == 0:
        return "–²"
    text = f"{mean:.4g}" + (f" ± {std:.2g}" if n > 1 else "")
    text = f"**{text}**" if best else text
    return text + (f" (n={n}/{expected})" if n < expected else "")


def to_markdown(table: Table, tier: str) -> str:
    spec, frame = table.spec, table.display.reset_index()
    lines = [
        f"# {spec.name}: {spec.title}",
        "",
        f"Tier: `{tier}`. Mean ± std over seeds.",
        "",
        "| " + " | ".join(frame.columns) + " |",
        "|" + "---|" * len(frame.columns),
    ]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.to_numpy()]
    if table.paired is not None:
        control = ", ".join(f"{k} = {v}" for k, v in spec.control.items())
        paired = table.paired.reset_index().rename(columns={"index": "row"})
        lines += [
            "",
            f"Paired difference from the control ({control}) of the same seed: "
            "mean ± standard error over the pairs.",
            "",
            "| " + " | ".join(paired.columns) + " |",
            "|" + "---|" * len(paired.columns),
        ]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in paired.to_numpy()]
    notes = []
    if table.floors:
        floors = ", ".join(f"{d} {v:.3g}" for d, v in table.floors.items())
        notes.append(
            "quality: does the model generate? FID of the samples against held-out "
            "images within 3x the real-vs-real floor, the dataset classifier "
            "confident (>= 0.9) on >= 0.8x as many samples as on real images, every "
            f"class generated. Real-vs-real FID floor at this n: {floors}."
        )
    if any("n/a¹" in str(v) for v in frame.to_numpy().ravel()):
        notes.append(f"¹ paper value not transcribed yet ({spec.paper_source or 'paper'}).")
    elif spec.paper_source and not any(str(c).endswith(" (paper)") for c in frame.columns):
        notes.append(
            f"The paper's values ({spec.paper_source}) are not transcribed: its tables are "
            "not part of this offline repository. Added to the spec's `paper:` (by row "
            "label and metric), they appear in a column beside each metric."
        )
    if any(str(v).endswith("³") for v in frame.to_numpy().ravel()):
        notes.append(
            f"³ within {FLOOR_SDS:g} s.d. of its permutation floor: not told apart "
            "from a code that knows nothing of the factors."
        )
    if any(str(c).endswith((" floor", " ceiling")) for c in frame.columns):
        notes.append(
            "floor: the metric with the factors (or labels) permuted across samples, "
            "mean ± s.d. over permutations; ceiling: the metric on a planted code of "
            "the same size and spectrum (the factors as axes) / that code randomly "
            "rotated (a rotation-invariant read-out keeps its ceiling; D, C and MIG "
            "do not). Both computed in the same run, averaged over the row's runs."
        )
    if any("–²" in str(v) for v in frame.to_numpy().ravel()):
        notes.append(
            "² no value: no finished run of the row has this metric (not yet run or "
            "failed: see below), or the metric is not defined for the dataset "
            "(e.g. leakage and interaction need two attributes; mnist has one)."
        )
    notes += [f"- missing: {p}" for p in table.problems]
    notes += [f"- {n}" for n in spec.notes]
    return "\n".join([*lines, "", *notes, ""])


def write_table(table: Table, tier: str, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / table.spec.name
    paths = [stem.with_suffix(".md"), stem.with_suffix(".tex"), stem.with_suffix(".csv")]
    paths[0].write_text(to_markdown(table, tier))
    latex = table.display.replace(r"\*\*(.*)\*\*", r"\\textbf{\1}", regex=True)
    latex.style.to_latex(
        paths[1],
        caption=f"{table.spec.title} ({tier} tier)",
        label=f"tab:{table.spec.name}",
        hrules=True,
    )
    table.numbers.to_csv(paths[2])
    return paths


def render_all(run_root: Path, tier: str, out: Path, names: list[str] | None = None) -> list[Path]:
    """The tables of the named table specs (default: every one with runs) under out/<tier>/;
    UserError, before any is written, when a named spec has no runs."""
    root = run_root / tier
    df = collect_runs(root)
    specs = [load_spec(n) for n in names] if names else all_specs()
    built = [build_table(df, spec, tier) for spec in specs if spec.kind == "table"]
    absent = {
        t.spec.name: why
        for t in built
        if (why := not_swept(t.spec.name, t.spec.name, t.rows, root, tier))
    }
    refuse_or_list(absent, bool(names), root, tier)  # no page of "not run" rows
    written = []
    for table in built:
        if table.spec.name not in absent:
            written += write_table(table, tier, out / tier / "tables")
    return written


def main(argv: list[str]) -> int:
    def work(args: cli.Args) -> int:
        for path in render_all(args.run_root, args.tier, args.out, args.names):
            if path.suffix == ".md":
                print(f"wrote {path} (+ .tex, .csv)")
        return 0

    return cli.analysis(__doc__, argv, work)


def command() -> None:
    """The `isodiff-tables` console command."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    command()
