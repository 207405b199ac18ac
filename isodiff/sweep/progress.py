"""Where a plan stands: each job's state, and what is left of it in time, estimated from the
jobs already measured. `python -m isodiff.sweep --plan` prints it; a sweep reports it
before launching and as its jobs finish.

A planned job is evaluated (done, and every metric it needs stored from its weights, none
failed since), done (trained, some metric missing), running, pending (not run, or its
status or weights lost: it trains again), interrupted or failed. Its cost is measured by
the done jobs of its kind (the same model and stage under the tier's folder): training, the
planned train.steps at their median steps/s (status.json); evaluation, each metric's median
seconds (metrics.json provenance). A metric no such job measured is "unmeasured", never
guessed. Evaluation is compared by metric names and weights only: a changed evaluation
preset shows when the evaluation runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from isodiff.runs.files import RunFileError
from isodiff.runs.status import (
    DONE,
    FAILED,
    RUNNING,
    UNREADABLE,
    WEIGHTS_CHANGED,
    job_state,
    open_failures,
    read_metrics,
    read_status,
    stale_metrics,
)
from isodiff.sweep.plan import Plan, PlannedJob
from isodiff.train.job import INTERRUPTED

EVALUATED, PENDING = "evaluated", "pending"
STATES = (EVALUATED, DONE, RUNNING, PENDING, INTERRUPTED, FAILED)  # in the order shown
TO_TRAIN = (PENDING, RUNNING, INTERRUPTED, FAILED)
Kind = tuple[str, str]  # (model.name, stage): jobs whose costs compare
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def to_evaluate(run_dir: Path, metrics: list[str]) -> list[str]:
    """The metrics of `metrics` a done job lacks: not stored, measured on other weights, or
    failed since (all of them when metrics.json is unreadable)."""
    try:
        record = read_metrics(run_dir, {})
    except RunFileError:
        return list(metrics)
    stored = record.get("metrics") or {}
    redo = set(stale_metrics(record, read_status(run_dir) or {})) | set(open_failures(record))
    return [m for m in metrics if m not in stored or m in redo]


def planned_state(run_dir: Path, metrics: list[str]) -> tuple[str, str | None]:
    """(one of STATES, why, for a job not as it should be) of a planned job's folder."""
    state, problem = job_state(run_dir)
    if state == "not run":
        return PENDING, None
    if state in (UNREADABLE, WEIGHTS_CHANGED):  # the sweep trains it again
        return PENDING, problem
    if state in (RUNNING, INTERRUPTED):
        return state, None
    if state != DONE:
        return FAILED, (problem or "no error recorded").splitlines()[0]
    if lacking := to_evaluate(run_dir, metrics):
        return DONE, f"to evaluate: {', '.join(lacking)}"
    return (EVALUATED if metrics else DONE), None


@dataclass(frozen=True)
class Measured:
    """What a done job measured: its kind, its steps and their rate, each metric's seconds."""

    kind: Kind
    steps: int | None = None
    steps_per_s: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def train_s(self) -> float | None:
        return self.steps / self.steps_per_s if self.steps and self.steps_per_s else None


def _number(value: object) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return float(value) if ok else None


def measured(run_dir: Path) -> Measured | None:
    """A done job's measurements; None when it is not done or its config does not say its
    kind (a released model's folder, a hand-made one)."""
    status = read_status(run_dir) or {}
    if status.get("state") != DONE:
        return None
    try:
        config = yaml.load((run_dir / "config.yaml").read_text(), Loader=_Loader)
        kind = (str(config["model"]["name"]), str(config["stage"]))
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    try:
        record = read_metrics(run_dir, {})
    except RunFileError:
        record = {}
    seconds = {
        name: s
        for name, entry in (record.get("metrics") or {}).items()
        if (s := _number((entry.get("provenance") or {}).get("seconds"))) is not None
    }
    steps = status.get("step") if isinstance(status.get("step"), int) else None
    return Measured(kind, steps, _number(status.get("steps_per_s")), seconds)


def measure_tier(tier_root: Path) -> dict[Path, Measured]:
    """Every done job under a tier's folder, by folder, with what it measured."""
    found = {}
    for marker in sorted(tier_root.rglob("status.json")):
        if (m := measured(marker.parent)) is not None:
            found[marker.parent] = m
    return found


@dataclass(frozen=True)
class Basis:
    """What estimates rest on, per kind: the median training rate, each metric's median
    seconds, and how many measured jobs each median comes from."""

    rate: dict[Kind, float]
    seconds: dict[tuple[Kind, str], float]
    jobs: dict[Kind, int]


def basis(jobs: Iterable[Measured]) -> Basis:
    rates: dict[Kind, list[float]] = {}
    seconds: dict[tuple[Kind, str], list[float]] = {}
    counts: dict[Kind, int] = {}
    for job in jobs:
        counts[job.kind] = counts.get(job.kind, 0) + 1
        if job.steps_per_s is not None:
            rates.setdefault(job.kind, []).append(job.steps_per_s)
        for metric, s in job.seconds.items():
            seconds.setdefault((job.kind, metric), []).append(s)
    return Basis(
        {k: statistics.median(v) for k, v in rates.items()},
        {k: statistics.median(v) for k, v in seconds.items()},
        counts,
    )


@dataclass
class Cost:
    """Seconds of training and evaluation, and what had no measurement to estimate it."""

    train_s: float = 0.0
    eval_s: float = 0.0
    unmeasured: list[str] = field(default_factory=list)  # "training" and metric names

    def add(self, other: Cost) -> None:
        self.train_s += other.train_s
        self.eval_s += other.eval_s
        self.unmeasured += [u for u in other.unmeasured if u not in self.unmeasured]


def estimate(kind: Kind, steps: int | None, train: bool, metrics: list[str], on: Basis) -> Cost:
    """The estimated cost of training a job of this kind for `steps` (when `train`) and of
    evaluating `metrics` on it, from the medians of its kind's measured jobs."""
    cost = Cost()
    if train:
        if steps is not None and kind in on.rate:
            cost.train_s = steps / on.rate[kind]
        else:
            cost.unmeasured.append("training")
    for metric in metrics:
        if (kind, metric) in on.seconds:
            cost.eval_s += on.seconds[(kind, metric)]
        else:
            cost.unmeasured.append(metric)
    return cost


@dataclass
class JobStanding:
    """A planned job now: its state, why (if not as it should be), what it cost so far
    (measured) and what is left (estimated)."""

    job: PlannedJob
    state: str
    note: str | None
    spent: Cost
    left: Cost
    metrics_left: list[str]

    @property
    def to_train(self) -> bool:
        return self.state in TO_TRAIN


def standing(job: PlannedJob, run_dir: Path, on: Basis) -> JobStanding:
    """A planned job in its folder: its state, its own measured cost, and the estimate of
    what is left (all its metrics when it trains again)."""
    state, note = planned_state(run_dir, job.metrics)
    train = state in TO_TRAIN
    lacking = list(job.metrics) if train else to_evaluate(run_dir, job.metrics)
    kind = (job.model or "?", job.stage)
    spent = Cost()
    if not train and (own := measured(run_dir)) is not None:
        spent.train_s = own.train_s or 0.0
        spent.eval_s = sum(
            s for m, s in own.seconds.items() if m in job.metrics and m not in lacking
        )
    return JobStanding(
        job, state, note, spent, estimate(kind, job.steps, train, lacking, on), lacking
    )


def duration(seconds: float) -> str:
    """Seconds as a person reads a wait: "<1 min", "12 min", "1.5 h"."""
    if seconds < 60:
        return "<1 min"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def about(seconds: float) -> str:
    """An estimate's duration: "~12 min" (one under a minute is said as such)."""
    return duration(seconds) if seconds < 60 else f"~{duration(seconds)}"


def _unmeasured(names: list[str]) -> str:
    return f"; {', '.join(names)} unmeasured" if names else ""


def _job_line(s: JobStanding) -> str:
    parts, unmeasured = [], s.left.unmeasured
    if s.spent.train_s:
        parts.append(f"trained in {duration(s.spent.train_s)}")
    if s.spent.eval_s:
        parts.append(f"evaluated in {duration(s.spent.eval_s)}")
    if s.to_train:
        parts.append(f"train {about(s.left.train_s)}" if s.left.train_s else "train")
    if s.metrics_left and s.to_train:
        parts.append(f"evaluate {about(s.left.eval_s)}" if s.left.eval_s else "evaluate")
    elif s.metrics_left:  # a done job's: which metrics
        what = f"evaluate {', '.join(s.metrics_left)}"
        if s.left.eval_s:
            parts.append(f"{what} {about(s.left.eval_s)}")
        else:  # none measured: said once
            parts.append(f"{what} (unmeasured)")
            unmeasured = [u for u in unmeasured if u not in s.metrics_left]
    note = f"  ({s.note})" if s.note and s.state != DONE else ""
    return (
        f"  {s.state:11s} {s.job.stage:8s} {s.job.folder}{note}\n"
        f"              {', '.join(parts) or 'nothing left'}{_unmeasured(unmeasured)}"
    )


def counts(standings: list[JobStanding]) -> str:
    states = [s.state for s in standings]
    return ", ".join(f"{states.count(s)} {s}" for s in STATES if s in states)


def _left(standings: list[JobStanding]) -> Cost:
    left = Cost()
    for s in standings:
        left.add(s.left)
    return left


def remaining(standings: list[JobStanding]) -> str:
    """What is left: jobs to train and to evaluate, with their estimated time."""
    left = _left(standings)
    train = sum(s.to_train for s in standings)
    evaluate = sum(bool(s.metrics_left) for s in standings)
    est = f" ({about(left.train_s)} est.)" if left.train_s else ""
    eval_est = f" ({about(left.eval_s)} est.)" if left.eval_s else ""
    return f"{train} to train{est}, {evaluate} to evaluate{eval_est}{_unmeasured(left.unmeasured)}"


def headline(name: str, standings: list[JobStanding]) -> str:
    """One line before a sweep launches: its jobs, how many are done, what is left."""
    done = sum(not s.to_train for s in standings)
    return f"{name}: {len(standings)} jobs, {done} done, {remaining(standings)}"


def describe(plan: Plan, standings: list[JobStanding], on: Basis, root: Path) -> str:
    """The plan as `--plan` prints it: every job's state and cost, then the totals and what
    the estimate rests on."""
    spent = Cost()
    for s in standings:
        spent.add(s.spent)
    kinds = sorted({(s.job.model or "?", s.job.stage) for s in standings})
    rests = [
        f"{model}/{stage}: {on.jobs[(model, stage)]} measured jobs"
        + (f", median {on.rate[(model, stage)]:.3g} steps/s" if (model, stage) in on.rate else "")
        if (model, stage) in on.jobs
        else f"{model}/{stage}: no measured job"
        for model, stage in kinds
    ]
    done = [s for s in standings if not s.to_train]
    left = _left(standings)
    total = f"; {about(left.train_s + left.eval_s)} in all" if left.train_s + left.eval_s else ""
    return "\n".join(
        [
            f"{plan.spec} (tier {plan.tier}): {len(standings)} jobs: {counts(standings)}",
            *(_job_line(s) for s in standings),
            f"  to do: {remaining(standings)}{total}",
            f"  done: {len(done)} jobs, {duration(spent.train_s + spent.eval_s)} measured",
            f"  the estimate rests on the done jobs under {root} of the same model and stage "
            f"({'; '.join(rests)})",
        ]
    )


class Watch:
    """Jobs a sweep launched, looked at while it runs: a line for each that reached one of
    `ends` since the last look (its status or metrics file rewritten), counted [k/N]."""

    def __init__(self, jobs: dict[Path, list[str]], ends: tuple[str, ...]) -> None:
        self.jobs, self.ends, self.finished = jobs, ends, 0
        self.seen = {d: self._mark(d, m) for d, m in jobs.items()}

    @staticmethod
    def _mark(run_dir: Path, metrics: list[str]) -> tuple[str, int, int]:
        times = [
            (run_dir / name).stat().st_mtime_ns if (run_dir / name).is_file() else 0
            for name in ("status.json", "metrics.json")
        ]
        return (planned_state(run_dir, metrics)[0], *times)

    def poll(self) -> list[str]:
        lines = []
        for run_dir, metrics in self.jobs.items():
            mark = self._mark(run_dir, metrics)
            if mark != self.seen[run_dir] and mark[0] in self.ends:
                self.finished += 1
                lines.append(
                    f"[{self.finished}/{len(self.jobs)}] {run_dir.parent.name}/{run_dir.name} "
                    f"{self._outcome(run_dir, metrics, mark[0])}"
                )
            self.seen[run_dir] = mark
        return lines

    @staticmethod
    def _outcome(run_dir: Path, metrics: list[str], state: str) -> str:
        own = measured(run_dir)
        if state == EVALUATED and own is not None:
            return f"evaluated (in {duration(sum(own.seconds.get(m, 0.0) for m in metrics))})"
        if state in (DONE, EVALUATED) and own is not None and own.train_s:
            return f"done (trained in {duration(own.train_s)})"
        note = planned_state(run_dir, metrics)[1]
        return f"{state}: {note}" if note and state != DONE else state
