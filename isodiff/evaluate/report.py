"""What an evaluation says to its reader: the summary table printed at its end, and the run's
page <run>/report.md (rewritten when metrics.json changes), both read from metrics.json.

Each metric shows its headline values (its declaration's `summary`) with what metrics.json
records beside each value X: its spread (X_std, or X_se; <stem>_std beside <stem>_mean), its
floor (X_floor, with X_floor_sd for a permutation floor; fid_floor is FID's real-vs-real
one), its ceiling (X_ceiling, X_ceiling_rot) and the real images' value (X_real); then its
direction and the seconds it took (provenance.seconds).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isodiff.evaluate.metrics import lower_is_better, registry
from isodiff.evaluate.metrics.calibration import within_floor
from isodiff.evaluate.metrics.quality import CONFIDENT_RATIO, FID_RATIO, check
from isodiff.runs.files import atomic_write_text

COMPUTED, SKIPPED, FAILED = "computed", "skipped", "failed"
# what metrics.json records beside a value X, never a headline itself
COMPANIONS = ("_floor", "_floor_sd", "_ceiling", "_ceiling_rot", "_std", "_se", "_n", "_real")
FALLBACK_VALUES = 3  # headline values of a metric that declares none
# protocol fields a reader needs to weigh a number (the rest: metrics.json)
ESSENTIALS = (
    "n",
    "ref_n",
    "real_n",
    "fit_n",
    "pairs",
    "frames",
    "steps",
    "timesteps",
    "method",
    "permutations",
    "resamples",
    "backbone",
)
# the run's config keys that say what it is (report.md), and a released model's
RUN_KEYS = (
    "experiment",
    "tier.name",
    "data.name",
    "data.resolution",
    "model.name",
    "model.arch",
    "lambda_iso",
    "iso.metric",
    "iso.window",
    "seed",
    "init_from",
    "stage",
    "train.steps",
)
RELEASED_KEYS = ("released.name", "released.sha256", "released.schedule", "data.name", "tier.name")
HEADER = ("metric", "state", "value", "floor / reference", "better", "seconds")


@dataclass(frozen=True)
class Line:
    """One headline value of a metric (the metric's first line carries its state and time)."""

    metric: str
    state: str
    value: str
    reference: str
    better: str
    seconds: str
    arrays: str = ""
    protocol: str = ""

    @property
    def cells(self) -> tuple[str, ...]:
        """The cells under HEADER."""
        return (self.metric, self.state, self.value, self.reference, self.better, self.seconds)


def fmt(x: float) -> str:
    return f"{x:.4g}"


def headline(name: str, values: dict[str, float]) -> list[str]:
    """The metric's headline value names present in `values`, in its declaration's order."""
    candidates = [k for k in values if not k.endswith(COMPANIONS)]
    metric = registry().get(name)
    if metric is None or not metric.summary:
        return candidates[:FALLBACK_VALUES]
    return [k for p in metric.summary for k in candidates if re.fullmatch(p, k)]


def spread(values: dict[str, float], key: str) -> str:
    """' ± s' (standard deviation) or ' ± s se' (standard error) beside a value, or ''."""
    stem = key.removesuffix("_mean") if key.endswith("_mean") else key
    if f"{stem}_std" in values:
        return f" ± {fmt(values[f'{stem}_std'])}"
    if f"{key}_se" in values:
        return f" ± {fmt(values[f'{key}_se'])} se"
    return ""


def reference(values: dict[str, float], key: str) -> str:
    """The floor, ceiling and real-image value recorded beside a value; 'at floor' where the
    value lies within calibration.FLOOR_SDS s.d. of its permutation floor."""
    parts = []
    if f"{key}_floor" in values:
        floor, sd = values[f"{key}_floor"], values.get(f"{key}_floor_sd")
        text = f"floor {fmt(floor)}"
        if sd is None:  # a permutation floor has its s.d.; fid_floor is real vs real
            text += " (real vs real)"
        else:
            text += f" ± {fmt(sd)}"
            if key in values and within_floor(values[key], floor, sd):
                text += " (at floor)"
        parts.append(text)
    if f"{key}_ceiling" in values:
        rotated = values.get(f"{key}_ceiling_rot", math.nan)
        parts.append(f"ceiling {fmt(values[f'{key}_ceiling'])} / rotated {fmt(rotated)}")
    if f"{key}_real" in values:
        parts.append(f"real {fmt(values[f'{key}_real'])}")
    return "; ".join(parts)


def essentials(protocol: dict[str, Any]) -> str:
    """The protocol fields in ESSENTIALS, as k=v."""
    return ", ".join(f"{k}={protocol[k]}" for k in ESSENTIALS if k in protocol)


def metric_lines(name: str, state: str, record: dict[str, Any]) -> list[Line]:
    """The lines of one metric: its headline values, or why it has none."""
    entry = record.get("metrics", {}).get(name, {})
    seconds = entry.get("provenance", {}).get("seconds")
    took = "" if seconds is None else f"{seconds:.1f}"
    shown = {COMPUTED: "computed", SKIPPED: "up to date, skipped", FAILED: "FAILED"}[state]
    if state == SKIPPED and took:
        took = f"({took})"  # when it was computed
    if state == FAILED:
        error = record.get("failed", {}).get(name, {}).get("error", "see metrics.json")
        return [Line(name, shown, error.splitlines()[0][:120], "", "", "")]
    values = entry.get("values", {})
    keys = headline(name, values)
    if not keys:
        return [Line(name, shown, "no values (see its protocol)", "", "", took)]
    arrays = entry.get("arrays") or ""
    protocol = essentials(entry.get("protocol", {}))
    lines = []
    for i, key in enumerate(keys):
        first = i == 0
        lines.append(
            Line(
                name if first else "",
                shown if first else "",
                f"{key} {fmt(values[key])}{spread(values, key)}",
                reference(values, key),
                "lower" if lower_is_better(key) else "higher",
                took if first else "",
                arrays if first else "",
                protocol if first else "",
            )
        )
    return lines


def quality_verdict(record: dict[str, Any]) -> str:
    """The quality check of the run's stored values (quality.check): passes, or its reasons."""
    metrics = record.get("metrics", {})
    if "fid" not in metrics and "quality" not in metrics:
        return "not measured (eval.fid and eval.quality)"
    values = {**metrics.get("fid", {}).get("values", {})}
    values.update(metrics.get("quality", {}).get("values", {}))
    reasons = check(values)
    return "passes" if not reasons else "fails: " + "; ".join(reasons)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def summary(record: dict[str, Any], states: dict[str, str], run_dir: Path) -> str:
    """The table printed at the end of an evaluation: every metric it was asked for, in that
    order (states: name -> COMPUTED | SKIPPED | FAILED)."""
    lines = [line for name, state in states.items() for line in metric_lines(name, state, record)]
    rows = [HEADER, *(x.cells for x in lines)]
    counts = {s: sum(v == s for v in states.values()) for s in (COMPUTED, SKIPPED, FAILED)}
    took = sum(
        record["metrics"][n]["provenance"].get("seconds", 0.0)
        for n, s in states.items()
        if s == COMPUTED and n in record.get("metrics", {})
    )
    return "\n".join(
        [
            f"evaluation of {run_dir}",
            _table(rows),
            f"{len(states)} metrics: {counts[COMPUTED]} computed in {took:.1f} s, "
            f"{counts[SKIPPED]} up to date (skipped; (seconds) when computed), "
            f"{counts[FAILED]} failed",
            f"quality check: {quality_verdict(record)}",
            f"values and protocols: {run_dir / 'metrics.json'}; page: {run_dir / 'report.md'}",
        ]
    )


def _get(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def _md_row(cells: tuple[str, ...] | list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") or " " for c in cells) + " |"


def page(
    run_dir: Path, record: dict[str, Any], states: dict[str, str], config: dict[str, Any]
) -> str:
    """report.md: what the run is, its samples, its quality check and the table of every
    metric metrics.json holds (those of this evaluation with its states, the others as
    stored), with floors, protocol essentials and links to the arrays."""
    released = bool(config.get("released"))
    keys = RELEASED_KEYS if released else RUN_KEYS
    what = [(k, _get(config, k)) for k in keys]
    stored = record.get("metrics", {})
    every = {**states, **{n: SKIPPED for n in stored if n not in states}}
    every.update({n: FAILED for n in record.get("failed", {}) if n not in every})
    order = list(registry())
    every = dict(sorted(every.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))
    lines = [line for name, state in every.items() for line in metric_lines(name, state, record)]
    common = next(iter(stored.values()), {}).get("protocol", {})
    shared = [
        f"{k}={common[k]}"
        for k in ("seed", "weights", "ema", "sampler", "clip_sample", "data")
        if k in common
    ]
    if "weights_sha256" in common:
        shared.append(f"weights_sha256={common['weights_sha256'][:12]}")
    samples = (
        "![samples](samples.png)"
        if (run_dir / "samples.png").is_file()
        else "no samples.png (eval.grid_samples is 0)"
    )
    out = [
        f"# {'Released model' if released else 'Run'} {run_dir.name}",
        "",
        f"`{run_dir}`; rewritten by each `python -m isodiff.evaluate`. Every value and "
        "protocol: [metrics.json](metrics.json).",
        "",
        "## What it is",
        "",
        "| key | value |",
        "|---|---|",
        *[_md_row((k, "–" if v is None else str(v))) for k, v in what],
        "",
        "## Samples",
        "",
        samples,
        "",
        "## Quality check",
        "",
        f"{quality_verdict(record)}. A run passes with FID (against held-out images) within "
        f"{FID_RATIO:g}x the real-vs-real floor, the dataset classifier confident on >= "
        f"{CONFIDENT_RATIO:g}x the fraction of real images, and every class generated.",
        "",
        "## Metrics",
        "",
        "Shared protocol: " + (", ".join(shared) or "–") + ".",
        "",
        _md_row((*HEADER, "protocol", "arrays")),
        "|---" * (len(HEADER) + 2) + "|",
        *[
            _md_row((*x.cells, x.protocol, f"[{x.arrays}]({x.arrays})" if x.arrays else ""))
            for x in lines
        ],
        "",
        "± : standard deviation (se: standard error); floor: the value with the labels "
        "permuted (± its s.d.; FID's: real images against the reference at the same n); "
        "ceiling: on a planted code / it rotated; real: on held-out real images; "
        "(seconds): when it was computed.",
        "",
    ]
    return "\n".join(out)


def write_page(
    run_dir: Path, record: dict[str, Any], states: dict[str, str], config: dict[str, Any]
) -> Path:
    """<run>/report.md, written atomically."""
    path = run_dir / "report.md"
    atomic_write_text(path, page(run_dir, record, states, config))
    return path
