"""Linear separability (StyleGAN, Karras et al. 2019, sec. 4.2) of attributes in h and x_T.

Generated samples are labelled by the dataset's attribute predictors (attributes.py):
categorical factors by class, continuous ones as above / below the median prediction,
circular ones (hue, in turns) by the half circle around their circular mean (label 1 where
cos(2 pi (angle - mean)) > 0: a median split of an angle would cut the circle at 0 and at
the median, two arbitrary points). As in StyleGAN, only the most confident
`confident_fraction` of samples per attribute is kept (categorical: class probability;
continuous: distance from the median; circular: |cos(2 pi (angle - mean))|). A linear SVM per
attribute is fit on a random part of them and scored on the held-out rest: the error, and
the conditional entropy H(Y | X_svm) of the labels given the SVM's predictions.
LS = exp(sum over attributes of H(Y | X_svm)) (1 = perfectly separable). StyleGAN scores on
the fitting set; here both numbers are held-out, so a high-dimensional h cannot score well
by fitting noise. h is read at the first DDIM step (t = T).

Values, per space (h, x_T): error_<space>_<attr>, error_<space> (mean over attributes) and
ls_<space>, each the mean over `resamples` random fit / held-out splits of the kept rows
(split k seeded by (seed, k), the same splits for every attribute and space), with
  X_se        its standard error over those splits (std ddof=1 / sqrt(resamples)): the
              noise of the split alone (the splits share rows and samples; it is not the
              spread over fresh samples);
  X_floor     the permutation null: the same statistic (same splits) with the attribute's
              labels permuted across the kept rows before fitting and scoring, mean over
              `permutations` permutations (permutation p of an attribute seeded by
              (seed, attribute, p); the same for h and x_T);
  X_floor_sd  the spread of the statistic over those permutations (std, ddof=1).
A value within about 2 X_floor_sd of X_floor is indistinguishable from labels that h or x_T
does not encode at all. Arrays: scores_<space> (attributes, splits, [error, entropy]) and
null_<space> (permutations, attributes, splits, [error, entropy]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from isodiff.errors import ConfigError
from isodiff.evaluate.metrics import Metric
from isodiff.evaluate.metrics.attributes import AttributeConfig, attribute_model
from isodiff.evaluate.metrics.factors import circular_mean
from isodiff.evaluate.metrics.result import MetricResult, protocol_of
from isodiff.model.seeding import derive_seed

if TYPE_CHECKING:  # torch and scikit-learn load inside the functions that use them
    from isodiff.evaluate.metrics.common import EvalContext

Split = tuple[np.ndarray, np.ndarray]  # (fitted rows, held-out rows)


@dataclass
class SeparabilityConfig:
    enabled: bool = True
    n: int = 2000  # generated samples
    steps: int = 50  # DDIM steps
    confident_fraction: float = 0.5
    heldout_fraction: float = 0.5
    C: float = 1.0  # SVM regularisation
    resamples: int = 5  # random fit / held-out splits: the value is their mean, X_se
    permutations: int = 5  # label permutations of the null: X_floor, X_floor_sd
    classifier: AttributeConfig = field(default_factory=AttributeConfig)

    def __post_init__(self) -> None:
        if not (0 < self.confident_fraction <= 1 and 0 < self.heldout_fraction < 1):
            raise ConfigError(
                "eval.separability needs confident_fraction in (0, 1] and "
                "heldout_fraction in (0, 1)"
            )
        if (
            self.n * self.confident_fraction * min(self.heldout_fraction, 1 - self.heldout_fraction)
            < 2
        ):
            raise ConfigError(
                f"eval.separability.n={self.n} leaves fewer than 2 samples to fit or to score"
            )
        if self.resamples < 2 or self.permutations < 2:  # a spread needs two draws
            raise ConfigError("eval.separability needs resamples >= 2 and permutations >= 2")


def conditional_entropy(y: np.ndarray, y_hat: np.ndarray) -> float:
    """H(Y | Y_hat) in nats from the empirical joint distribution of labels."""
    _, joint = np.unique(np.stack([y_hat, y]), axis=1, return_counts=True)
    _, marginal = np.unique(y_hat, return_counts=True)
    p_joint, p_marginal = joint / len(y), marginal / len(y)
    return float(-(p_joint * np.log(p_joint)).sum() + (p_marginal * np.log(p_marginal)).sum())


def linear_separability(
    features: np.ndarray, labels: np.ndarray, split: Split, C: float = 1.0
) -> dict[str, float]:
    """Fit a linear SVM on the split's fitted rows; error and H(Y | X_svm) on its held-out
    rows."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    fit, heldout = split
    fit_y, test_y = labels[fit], labels[heldout]
    if len(np.unique(fit_y)) == 1:  # one class only: the SVM is the constant
        predicted = np.full_like(test_y, fit_y[0])
    else:
        svm = make_pipeline(StandardScaler(), LinearSVC(C=C, max_iter=20_000, random_state=0))
        predicted = svm.fit(features[fit], fit_y).predict(features[heldout])
    return {
        "error": float(np.mean(predicted != test_y)),
        "entropy": conditional_entropy(test_y, predicted),
    }


def random_splits(m: int, heldout_fraction: float, resamples: int, seed: int) -> list[Split]:
    """`resamples` random partitions of range(m) into (1 - heldout_fraction) fitted rows and
    the held-out rest; split k seeded by (seed, k)."""
    fit = int(round(m * (1 - heldout_fraction)))
    orders = [
        np.random.default_rng(derive_seed("separability-split", seed, k)).permutation(m)
        for k in range(resamples)
    ]
    return [(order[:fit], order[fit:]) for order in orders]


def permuted_labels(labels: np.ndarray, permutations: int, seed: int) -> list[np.ndarray]:
    """The permutation null's labels: `labels` shuffled across rows, permutation p seeded by
    (seed, p). It keeps the class balance and breaks any link to the features."""
    return [
        np.random.default_rng(derive_seed("separability-permutation", seed, p)).permutation(labels)
        for p in range(permutations)
    ]


def split_scores(
    features: np.ndarray, labels: np.ndarray, splits: Sequence[Split], C: float = 1.0
) -> np.ndarray:
    """(error, entropy) of `linear_separability` on each split, (len(splits), 2)."""
    scores = [linear_separability(features, labels, split, C) for split in splits]
    return np.array([[s["error"], s["entropy"]] for s in scores])


def per_split_statistics(
    scores: np.ndarray, names: Sequence[str], space: str
) -> dict[str, np.ndarray]:
    """scores (..., A, K, 2): (error, entropy) of attribute a on split k -> every value of
    a space per split, (..., K): error_<space>_<attr>, error_<space> (mean over attributes)
    and ls_<space> = exp(sum over attributes of the entropy)."""
    errors, entropies = scores[..., 0], scores[..., 1]
    stats = {f"error_{space}_{name}": errors[..., a, :] for a, name in enumerate(names)}
    stats[f"error_{space}"] = errors.mean(axis=-2)
    stats[f"ls_{space}"] = np.exp(entropies.sum(axis=-2))
    return stats


def with_companions(
    name: str, per_split: np.ndarray, null_per_split: np.ndarray
) -> dict[str, float]:
    """A value and its companions from its statistic on each split (K,) and on each split
    of each permutation (P, K): the mean over splits, its standard error (X_se), and the
    mean and spread over permutations of the permuted statistic (X_floor, X_floor_sd)."""
    null = null_per_split.mean(axis=-1)  # the statistic itself: its mean over the splits
    return {
        name: float(per_split.mean()),
        f"{name}_se": float(per_split.std(ddof=1) / np.sqrt(len(per_split))),
        f"{name}_floor": float(null.mean()),
        f"{name}_floor_sd": float(null.std(ddof=1)),
    }


def confident_labels(
    prediction: np.ndarray, confidence: np.ndarray | None, fraction: float, circular: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, kept row indices in order): classes as predicted; continuous values as
    above the median; circular values (angles in turns) as within a quarter turn of their
    circular mean, confidence |cos(2 pi (angle - mean))|; the `fraction` most confident
    rows."""
    if circular:
        cos = np.cos(2 * np.pi * (prediction - circular_mean(prediction)))
        labels, confidence = (cos > 0).astype(np.int64), np.abs(cos)
    elif confidence is None:
        median = np.median(prediction)
        labels, confidence = (prediction > median).astype(np.int64), np.abs(prediction - median)
    else:
        labels = prediction.astype(np.int64)
    keep = max(1, int(round(len(labels) * fraction)))
    rows = np.sort(np.argsort(-confidence, kind="stable")[:keep])
    return labels, rows


def separability_values(
    spaces: dict[str, np.ndarray],
    predictions: dict[str, tuple[np.ndarray, np.ndarray | None]],
    kinds: dict[str, str],
    cfg: SeparabilityConfig,
    seed: int,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Every value with its companions, and the per-split arrays, from the features of each
    space (n, d) and each attribute's (prediction, confidence) and kind (the same n rows)."""
    names = list(predictions)
    kept, targets, nulls, splits = {}, {}, {}, {}
    for name, (prediction, confidence) in predictions.items():
        labels, rows = confident_labels(
            prediction, confidence, cfg.confident_fraction, circular=kinds[name] == "circular"
        )
        kept[name], targets[name] = rows, labels[rows]
        nulls[name] = permuted_labels(labels[rows], cfg.permutations, derive_seed(seed, name))
        splits[name] = random_splits(len(rows), cfg.heldout_fraction, cfg.resamples, seed)
    values, arrays = {}, {}
    for space, x in spaces.items():
        # (A, K, 2) and (P, A, K, 2): (error, entropy) per attribute and split
        scores = np.stack([split_scores(x[kept[n]], targets[n], splits[n], cfg.C) for n in names])
        null = np.stack(
            [
                np.stack([split_scores(x[kept[n]], nulls[n][p], splits[n], cfg.C) for n in names])
                for p in range(cfg.permutations)
            ]
        )
        observed = per_split_statistics(scores, names, space)
        permuted = per_split_statistics(null, names, space)
        for name, per_split in observed.items():
            values.update(with_companions(name, per_split, permuted[name]))
        arrays[f"entropy_{space}"] = scores[..., 1].mean(axis=1)
        arrays[f"scores_{space}"], arrays[f"null_{space}"] = scores, null
    return values, arrays


def evaluate(ctx: EvalContext, cfg: SeparabilityConfig) -> MetricResult:
    """LS and held-out SVM error of every attribute in h (t = T) and in x_T, each with its
    standard error over splits and its permutation floor."""
    import torch

    from isodiff.model.sampling import latents

    predictor = attribute_model(ctx, cfg.classifier)
    t_T = int(ctx.ddim(cfg.steps).schedule.timesteps[0])
    spaces: dict[str, list[np.ndarray]] = {"h": [], "x_T": []}
    predicted: list[dict] = []
    for rows in ctx.chunks(cfg.n, "separability samples"):
        x_T = latents(ctx.seed, rows, ctx.x_shape)
        predicted.append(predictor.predict(ctx.generated(cfg.steps, rows)))
        with torch.no_grad():
            spaces["h"].append(ctx.unet.encode_h(x_T.to(ctx.device), t_T).flatten(1).cpu().numpy())
        spaces["x_T"].append(x_T.flatten(1).numpy())
    predictions = {}
    for a in predictor.attributes:
        confidence = [p[a.name][1] for p in predicted]
        predictions[a.name] = (
            np.concatenate([p[a.name][0] for p in predicted]),
            None if confidence[0] is None else np.concatenate(confidence),
        )
    kinds = {a.name: a.kind for a in predictor.attributes}
    values, arrays = separability_values(
        {k: np.concatenate(v) for k, v in spaces.items()},
        predictions,
        kinds,
        cfg,
        derive_seed("separability", ctx.seed),
    )
    protocol = {
        **protocol_of(cfg),
        "h_at": "first DDIM step (t = T)",
        "departure": "features standardised (StandardScaler) before the linear SVM; "
        "StyleGAN fits the SVM on raw latents",
        "labels": "categorical: class; continuous: above the median; circular: "
        "within a quarter turn of the circular mean",
        "splits": "value = mean over `resamples` random fit / held-out splits of "
        "the kept rows; X_se = their std (ddof=1) / sqrt(resamples)",
        "floor": "X_floor, X_floor_sd: mean and std (ddof=1) of the same statistic "
        "over `permutations` permutations of the kept rows' labels",
        "attributes": list(kinds),
    }
    return MetricResult(
        values, protocol, {"classifier_heldout": predictor.report, "kinds": kinds}, arrays
    )


METRIC = Metric(
    name="separability",
    config=SeparabilityConfig,
    values=("ls_", "error_"),
    order=6,
    summary=("ls_h", "ls_x_T", "error_h", "error_x_T"),
)
