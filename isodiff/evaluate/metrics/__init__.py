"""The paper's evaluation metrics, one module each (reference/metrics.md), and their registry.

Each metric module holds the metric's pure maths (arrays in, numbers out), its config (one
section of conf/eval/<preset>.yaml), `evaluate(ctx, cfg) -> MetricResult`, which draws what
the maths needs from a trained model through `isodiff.evaluate.metrics.common.EvalContext`, and one
declaration `METRIC = Metric(...)`: its name, config, the values it writes and their
direction. `registry()` finds the declarations, so adding a metric means writing its module
and its sections of conf/eval/*.yaml; isodiff.evaluate.config and isodiff.evaluate.measure derive
the rest. Metric modules import torch and the other heavy libraries inside their functions
only: a config is checked, and a metric's value named, without loading them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from isodiff.evaluate.metrics.common import EvalContext
    from isodiff.evaluate.metrics.result import MetricResult


@dataclass(frozen=True)
class Metric:
    """A metric's declaration (its module's METRIC).

    name: the metric and its config section (eval.<name>); config: that section's dataclass;
    values: the names or name prefixes of the metrics.json values it writes; higher_is_better:
    those of its values (names or prefixes) where more is better (every other value is better
    lower); version: bumped when its values change or grow, so that results stored before are
    computed again; order: its place among the metrics (evaluation order, config order);
    summary: regular expressions (whole names) of its headline values, which the summary of an
    evaluation and the run's report.md show (isodiff.evaluate.report; none: its first values).
    module: the declaring module, filled in by `registry()`.
    """

    name: str
    config: type
    values: tuple[str, ...]
    higher_is_better: tuple[str, ...] = ()
    version: int = 1
    order: int = 100
    summary: tuple[str, ...] = ()
    module: str = ""

    def evaluate(self, ctx: EvalContext, cfg: Any) -> MetricResult:
        """Compute the metric: its module's evaluate(ctx, cfg)."""
        return importlib.import_module(self.module).evaluate(ctx, cfg)


# A module-level `METRIC =` in the source: the helper modules (common, perceptual, ...) are
# not imported to find out, since some of them load torch.
_DECLARES = re.compile(r"^METRIC\s*[:=]", re.MULTILINE)


@functools.cache
def registry() -> dict[str, Metric]:
    """name -> Metric of every module of this package that declares one, in their order.
    Cached: registry.cache_clear() after adding a module to the package's path."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = f"{__name__}.{info.name}"
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        if not _DECLARES.search(Path(spec.origin).read_text(encoding="utf-8")):
            continue
        metric = importlib.import_module(module).METRIC
        found.append(replace(metric, module=module))
    found.sort(key=lambda m: (m.order, m.name))
    metrics = {m.name: m for m in found}
    if len(metrics) < len(found):
        raise RuntimeError(f"two metric modules declare one name: {[m.name for m in found]}")
    return metrics


def lower_is_better(value: str) -> bool:
    """Whether a smaller number of this metric value is the better one (FID, PPL, RTL, MCN,
    VoR, LS as a conditional entropy, errors, LPIPS, MSE; each metric names the others). A
    spec's `lower_is_better` overrides this per value (e.g. the R^2 of an edit, lin_*_r2)."""
    higher = tuple(p for m in registry().values() for p in m.higher_is_better)
    return not value.startswith(higher)
