"""Linear separability (StyleGAN, Karras et al. 2019, sec. 4.2) of attributes in h and x_T.

Generated samples are labelled by the dataset's attribute predictors (attributes.py):
categorical factors by class, continuous ones as above / below the median prediction. As in
StyleGAN, only the most confident `confident_fraction` of samples per attribute is kept
(categorical: class probability; continuous: distance from the median). A linear SVM per
attribute is fit on the first part of them and scored on the held-out rest: the error, and
the conditional entropy H(Y | X_svm) of the labels given the SVM's predictions.
LS = exp(sum over attributes of H(Y | X_svm)) (1 = perfectly separable). StyleGAN scores on
the fitting set; here both numbers are held-out, so a high-dimensional h cannot score well
by fitting noise. h is read at the first DDIM step (t = T).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from isodiff.config import ConfigError
from isodiff.metrics.attributes import AttributeConfig, attribute_model
from isodiff.metrics.common import EvalContext, MetricResult, protocol_of
from isodiff.sampling import latents


@dataclass
class SeparabilityConfig:
    enabled: bool = True
    n: int = 2000  # generated samples
    steps: int = 50  # DDIM steps
    confident_fraction: float = 0.5
    heldout_fraction: float = 0.5
    C: float = 1.0  # SVM regularisation
    classifier: AttributeConfig = field(default_factory=AttributeConfig)

    def __post_init__(self) -> None:
        if not (0 < self.confident_fraction <= 1 and 0 < self.heldout_fraction < 1):
            raise ConfigError("eval.separability needs confident_fraction in (0, 1] and "
                              "heldout_fraction in (0, 1)")
        if self.n * self.confident_fraction * min(self.heldout_fraction,
                                                  1 - self.heldout_fraction) < 2:
            raise ConfigError(f"eval.separability.n={self.n} leaves fewer than 2 samples to "
                              "fit or to score")


def conditional_entropy(y: np.ndarray, y_hat: np.ndarray) -> float:
    """H(Y | Y_hat) in nats from the empirical joint distribution of labels."""
    _, joint = np.unique(np.stack([y_hat, y]), axis=1, return_counts=True)
    _, marginal = np.unique(y_hat, return_counts=True)
    p_joint, p_marginal = joint / len(y), marginal / len(y)
    return float(-(p_joint * np.log(p_joint)).sum() + (p_marginal * np.log(p_marginal)).sum())


def linear_separability(features: np.ndarray, labels: np.ndarray, heldout_fraction: float = 0.5,
                        C: float = 1.0) -> dict[str, float]:
    """Fit a linear SVM on the first (1 - heldout_fraction) of the rows; held-out error and
    H(Y | X_svm) on the rest."""
    split = int(round(len(labels) * (1 - heldout_fraction)))
    fit_x, fit_y = features[:split], labels[:split]
    test_x, test_y = features[split:], labels[split:]
    if len(np.unique(fit_y)) == 1:  # one class only: the SVM is the constant
        predicted = np.full_like(test_y, fit_y[0])
    else:
        svm = make_pipeline(StandardScaler(), LinearSVC(C=C, max_iter=20_000, random_state=0))
        predicted = svm.fit(fit_x, fit_y).predict(test_x)
    return {"error": float(np.mean(predicted != test_y)),
            "entropy": conditional_entropy(test_y, predicted)}


def confident_labels(prediction: np.ndarray, confidence: np.ndarray | None,
                     fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels, kept row indices in order): classes as predicted, or continuous values as
    above the median; the `fraction` most confident rows."""
    if confidence is None:
        median = np.median(prediction)
        labels, confidence = (prediction > median).astype(np.int64), np.abs(prediction - median)
    else:
        labels = prediction.astype(np.int64)
    keep = max(1, int(round(len(labels) * fraction)))
    rows = np.sort(np.argsort(-confidence, kind="stable")[:keep])
    return labels, rows


def evaluate(ctx: EvalContext, cfg: SeparabilityConfig) -> MetricResult:
    """LS and held-out SVM error of every attribute in h (t = T) and in x_T."""
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
    labelled = {}
    for a in predictor.attributes:
        confidence = [p[a.name][1] for p in predicted]
        labelled[a.name] = confident_labels(
            np.concatenate([p[a.name][0] for p in predicted]),
            None if confidence[0] is None else np.concatenate(confidence),
            cfg.confident_fraction)
    values, arrays = {}, {}
    for space, parts in spaces.items():
        x = np.concatenate(parts)
        entropies, errors = [], []
        for name, (labels, rows) in labelled.items():
            result = linear_separability(x[rows], labels[rows], cfg.heldout_fraction, cfg.C)
            values[f"error_{space}_{name}"] = result["error"]
            entropies.append(result["entropy"])
            errors.append(result["error"])
        values[f"ls_{space}"] = float(np.exp(np.sum(entropies)))
        values[f"error_{space}"] = float(np.mean(errors))
        arrays[f"entropy_{space}"] = np.array(entropies)
    protocol = {**protocol_of(cfg), "h_at": "first DDIM step (t = T)",
                "departure": "features standardised (StandardScaler) before the linear SVM; "
                             "StyleGAN fits the SVM on raw latents",
                "attributes": [a.name for a in predictor.attributes]}
    return MetricResult(values, protocol, {"classifier_heldout": predictor.report}, arrays)
