"""Does the model generate? The quality check beside every table.

The dataset's own attribute classifier (attributes.py) labels N generated samples and N
held-out real images: the fraction labelled with confidence >= `confidence` and the class
histogram of each categorical factor, for both. `check` then judges a run from these and
FID (fid.py's `fid_heldout` against its real-vs-real `fid_floor`): a model passes when its
FID is within `FID_RATIO` times the floor, its confident fraction is at least
`CONFIDENT_RATIO` times the real one, and every class appears among its samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from isodiff.errors import ConfigError
from isodiff.evaluate.metrics import Metric
from isodiff.evaluate.metrics.attributes import AttributeConfig, attribute_model
from isodiff.evaluate.metrics.result import MetricResult, protocol_of

if TYPE_CHECKING:
    from isodiff.evaluate.metrics.common import EvalContext

FID_RATIO = 3.0
CONFIDENT_RATIO = 0.8


@dataclass
class QualityConfig:
    enabled: bool = True
    n: int = 1000  # generated samples and held-out real images
    # held-out real images for the reference fraction (null: n); only the classifier runs on
    # them, so a small n need not make the reference noisy (128 real MNIST digits: 100 %
    # confident, against 95.7 % of 1,000)
    real_n: int | None = None
    steps: int = 50  # DDIM steps (equal to eval.fid's: the same samples, generated once)
    confidence: float = 0.9
    classifier: AttributeConfig = field(default_factory=AttributeConfig)

    def __post_init__(self) -> None:
        if (
            self.n < 1
            or (self.real_n is not None and self.real_n < 1)
            or not 0 < self.confidence < 1
        ):
            raise ConfigError(
                "eval.quality needs n >= 1, real_n >= 1 (or null) and confidence in (0, 1)"
            )


def class_figures(
    labels: np.ndarray, confidence: np.ndarray, classes: int, threshold: float
) -> tuple[float, np.ndarray]:
    """(fraction of samples with confidence >= threshold, histogram of the labels of those
    confident samples over `classes`)."""
    confident = confidence >= threshold
    return float(confident.mean()), np.bincount(labels[confident], minlength=classes)


def evaluate(ctx: EvalContext, cfg: QualityConfig) -> MetricResult:
    """Confident fraction and class coverage of generated vs held-out real images (no values
    for a dataset without labels: its check is FID's alone)."""
    import torch  # here, not at the top: a config is checked without torch

    if not ctx.dataset("train").factor_names:
        return MetricResult({}, protocol_of(cfg))
    model = attribute_model(ctx, cfg.classifier)
    generated = torch.cat(
        [ctx.generated(cfg.steps, rows) for rows in ctx.chunks(cfg.n, "quality samples")]
    )
    real_n, key = (
        (cfg.n, "eval.quality.n") if cfg.real_n is None else (cfg.real_n, "eval.quality.real_n")
    )
    real = torch.cat(list(ctx.real_batches("test", real_n, key)))
    values, arrays = {}, {}
    for source, images in (("", generated), ("_real", real)):
        predictions = model.predict(images)
        for a in model.attributes:
            if a.kind != "categorical":
                continue
            labels, conf = predictions[a.name]
            fraction, histogram = class_figures(labels, conf, a.classes, cfg.confidence)
            values[f"confident_{a.name}{source}"] = fraction
            values[f"classes_{a.name}{source}"] = float((histogram > 0).sum())
            arrays[f"histogram_{a.name}{source}"] = histogram
    protocol = {**protocol_of(cfg), "classifier_heldout": model.report}
    return MetricResult(values, protocol, arrays=arrays)


def check(values: dict[str, float]) -> list[str]:
    """The reasons a run fails the quality check (empty: it passes), from its metric values:
    fid_heldout and fid_floor, and confident_<factor>, classes_<factor> with their _real
    counterparts (the classes real images show are the classes to cover). An unmeasured FID
    is a reason; classifier figures are checked where the dataset has labels."""
    reasons = []
    fid, floor = values.get("fid_heldout"), values.get("fid_floor")
    if fid is None or floor is None or not np.isfinite(fid):
        reasons.append("FID not measured")
    elif fid > FID_RATIO * floor:
        reasons.append(f"FID {fid:.3g} > {FID_RATIO:g}x the real-vs-real floor {floor:.3g}")
    factors = [
        k[len("confident_") :]
        for k in values
        if k.startswith("confident_") and not k.endswith("_real")
    ]
    for name in factors:
        ours, real = values[f"confident_{name}"], values.get(f"confident_{name}_real", np.nan)
        present, total = values.get(f"classes_{name}", 0), values.get(f"classes_{name}_real", 0)
        if not ours >= CONFIDENT_RATIO * real:
            reasons.append(
                f"{name}: {ours:.0%} of samples confidently classified, under "
                f"{CONFIDENT_RATIO:g}x the real {real:.0%}"
            )
        if present < total:
            reasons.append(f"{name}: {int(present)} of {int(total)} classes generated")
    return reasons


METRIC = Metric(
    name="quality",
    config=QualityConfig,
    values=("confident_", "classes_"),
    higher_is_better=("confident_", "classes_"),
    order=8,
    summary=("confident_.+", "classes_.+"),  # the real images' (_real) beside them
)
