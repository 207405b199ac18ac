"""Attribute predictors that label generated images, trained by the suite on the dataset.

One small CNN per dataset with a head per factor: a classifier for each categorical factor
(shapes: shape; mnist: digit), a regressor for each continuous one (shapes: size, x, y) and
a (cos, sin) regressor for each circular one (shapes: hue; isodiff.evaluate.metrics.factors), whose
prediction is the angle of its output. Trained on the train split, scored on the test split
(accuracy; R^2; angle error), cached with that report under the refs folder, keyed by the
dataset, its factors' kinds and this config. Linear separability uses them here; the
editing metrics reuse them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from isodiff.errors import ConfigError
from isodiff.evaluate.metrics.factors import angle_of, wrapped
from isodiff.model.seeding import derive_seed
from isodiff.runs.files import atomic_write_json
from isodiff.runs.identity import config_hash

# torch loads inside the functions that use it: the metrics' configs (AttributeConfig)
# are checked without it
if TYPE_CHECKING:
    import torch
    from torch import nn

    from isodiff.evaluate.metrics.common import EvalContext

log = logging.getLogger(__name__)


@dataclass
class AttributeConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32  # channels of the first conv; doubled at each of the 3 levels

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.width % 8:
            raise ConfigError(
                "eval.separability.classifier needs epochs, batch_size >= 1, "
                "lr > 0 and width a multiple of 8 (GroupNorm)"
            )


def attribute_net(channels: int, outputs: int, width: int) -> nn.Module:
    """3 stride-2 convs, global average pool, one linear layer giving every head's outputs.

    A Sequential of `features` then `head` rather than a module class, which would need torch
    to import this file; its parameters (their names and initialisation order) are those of
    the class it replaces, so cached classifiers still load."""
    from collections import OrderedDict

    from torch import nn

    layers, c = [], channels
    for w in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
        c = w
    features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.Sequential(OrderedDict(features=features, head=nn.Linear(c, outputs)))


@dataclass
class Attribute:
    name: str
    kind: str  # categorical | continuous | circular
    classes: int  # outputs: categorical: number of classes; continuous 1; circular 2
    mean: float = 0.0  # continuous: target standardisation
    std: float = 1.0


class AttributeModel:
    """Predicts every factor of an image batch in [-1, 1]."""

    def __init__(self, net: nn.Module, attributes: list[Attribute], report: dict) -> None:
        self.net, self.attributes, self.report = net.eval(), attributes, report

    def responses(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """name -> the head's raw output: categorical: the class logits (N, classes);
        continuous: the standardised value (N,) (value - mean) / std; circular: (cos, sin)
        (N, 2)."""
        import torch

        device = next(self.net.parameters()).device
        with torch.no_grad():
            out = torch.cat(
                [self.net(images[i : i + 256].to(device)).cpu() for i in range(0, len(images), 256)]
            ).double()
        result, col = {}, 0
        for a in self.attributes:
            part = out[:, col : col + a.classes]
            result[a.name] = (part[:, 0] if a.kind == "continuous" else part).numpy()
            col += a.classes
        return result

    def predict(self, images: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """name -> (prediction, confidence): categorical: the class and its probability;
        continuous: the value and None; circular: the angle in turns [0, 1) and None."""
        import torch

        result = {}
        for a, raw in zip(self.attributes, self.responses(images).values(), strict=True):
            if a.kind == "categorical":
                p = torch.from_numpy(raw).float().softmax(1)
                conf, label = p.max(1)
                result[a.name] = (label.numpy(), conf.double().numpy())
            elif a.kind == "circular":
                result[a.name] = (angle_of(raw), None)
            else:
                result[a.name] = (raw * a.std + a.mean, None)
        return result


def _loss(out: torch.Tensor, y: torch.Tensor, attributes: list[Attribute]) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    loss, col = out.new_zeros(()), 0
    for i, a in enumerate(attributes):
        if a.kind == "categorical":
            loss = loss + F.cross_entropy(out[:, col : col + a.classes], y[:, i].long())
        elif a.kind == "circular":
            angle = 2 * torch.pi * y[:, i]
            target = torch.stack([angle.cos(), angle.sin()], dim=1)
            loss = loss + F.mse_loss(out[:, col : col + 2], target) * 2  # per angle, not per axis
        else:
            loss = loss + F.mse_loss(out[:, col], (y[:, i] - a.mean) / a.std)
        col += a.classes
    return loss


def _score(model: AttributeModel, images: torch.Tensor, factors: torch.Tensor) -> dict:
    """Held-out accuracy (categorical), R^2 (continuous) or mean absolute angle error in
    degrees (circular) per attribute."""
    pred = model.predict(images)
    report = {}
    for i, a in enumerate(model.attributes):
        y = factors[:, i].double().numpy()
        if a.kind == "categorical":
            report[a.name] = {"accuracy": float(np.mean(pred[a.name][0] == y))}
        elif a.kind == "circular":
            error = np.abs(wrapped(pred[a.name][0] - y)).mean() * 360
            report[a.name] = {"angle_error_deg": float(error)}
        else:
            residual = np.sum((pred[a.name][0] - y) ** 2)
            report[a.name] = {"r2": float(1 - residual / np.sum((y - y.mean()) ** 2))}
    return report


def _train(ctx: EvalContext, cfg: AttributeConfig) -> AttributeModel:
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    train = ctx.dataset("train")
    factors = torch.stack([train[i][1] for i in range(len(train))])
    attributes = []
    for i, (name, kind) in enumerate(zip(train.factor_names, train.factor_kinds, strict=True)):
        column = factors[:, i].double()
        if kind == "categorical":
            attributes.append(Attribute(name, kind, int(column.max()) + 1))
        elif kind == "circular":
            attributes.append(Attribute(name, kind, 2))
        else:
            attributes.append(Attribute(name, kind, 1, float(column.mean()), float(column.std())))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("attributes", ctx.data_key))
        net = attribute_net(ctx.data.channels, sum(a.classes for a in attributes), cfg.width)
        net = net.to(ctx.device)
        optim = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
        loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True)
        for _ in tqdm(range(cfg.epochs), desc="attribute classifier", disable=not ctx.progress):
            for images, y in loader:
                loss = _loss(net(images.to(ctx.device)), y.to(ctx.device), attributes)
                optim.zero_grad()
                loss.backward()
                optim.step()
    test = ctx.dataset("test")
    model = AttributeModel(net, attributes, {})
    model.report = _score(
        model,
        torch.stack([test[i][0] for i in range(len(test))]),
        torch.stack([test[i][1] for i in range(len(test))]),
    )
    return model


def attribute_model(ctx: EvalContext, cfg: AttributeConfig) -> AttributeModel:
    """The dataset's attribute predictor: from the refs cache, or trained and cached."""
    import torch

    from isodiff.runs.files import atomic_save

    if not ctx.dataset("train").factor_names:
        raise ConfigError(
            f"data={ctx.data.name.value} has no factors to predict: attribute "
            "metrics need data=shapes, data=mnist, or data=folder with "
            "data.attributes=<a CelebA-style attribute file>"
        )
    # The factors' kinds enter the key: a cache from before hue was circular has other heads.
    key = {**dataclasses.asdict(cfg), "kinds": list(ctx.dataset("train").factor_kinds)}
    stem = Path(ctx.refs_dir) / f"attributes-{ctx.data_key}-{config_hash(key)}"
    weights, report = stem.with_suffix(".pt"), stem.with_suffix(".json")
    with ctx.building(weights):
        if weights.is_file() and report.is_file():
            meta = json.loads(report.read_text())
            attributes = [Attribute(**a) for a in meta["attributes"]]
            net = attribute_net(ctx.data.channels, sum(a.classes for a in attributes), cfg.width)
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            return AttributeModel(net.to(ctx.device), attributes, meta["heldout"])
        model = _train(ctx, cfg)
        atomic_save(weights, lambda tmp: torch.save(model.net.state_dict(), tmp))
        atomic_write_json(
            report,
            {
                "attributes": [dataclasses.asdict(a) for a in model.attributes],
                "heldout": model.report,
            },
        )
    log.info("attribute predictor cached in %s", weights)
    log.debug("its held-out scores: %s", model.report)  # also in its .json and each protocol
    return model
