"""isodiff's PPL maths against an independent implementation: torchmetrics'
perceptual_path_length (torchmetrics.functional.image), offline, with a distance module we
pass in (its default LPIPS would download torchvision's backbone weights).

Same sampler and distance on both sides: a fixed generator G (a tanh of a fixed linear map,
in float64), latents z1, z2 handed to torchmetrics through `sample`, epsilon 1e-4. The two
implementations differ by design, and the tests pin the differences:
- torchmetrics measures only at the path's start: G(z1) against G(I(z1, z2, eps)), whereas
  StyleGAN and isodiff draw t ~ U(0, 1); so isodiff is run at w = 0 here.
- torchmetrics wants G's images in [0, 255] and maps them to [-1, 1] before the distance;
  isodiff's images are in [-1, 1] already; G_tm = 255 (G + 1) / 2 undoes that exactly.
- torchmetrics' "slerp_any" takes the angle by acos, isodiff's slerp by atan2 (accurate at
  every angle); for random latents they agree to rounding.
- The outlier filter: both keep d within the 1st..99th percentiles, but torchmetrics takes
  both order statistics with interpolation "lower", isodiff's upper one with "higher"; they
  coincide when 0.99 (n - 1) is an integer (n = 101 below) and otherwise isodiff may keep
  one more (larger) distance.
Tolerance: rtol 1e-9 in float64. The distances are image differences of size eps = 1e-4
divided by eps^2, so float64 rounding (1e-16) is amplified to about 1e-12; float32 would
not do (1e-7 / 1e-4 = 1e-3).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from isodiff.evaluate.metrics.ppl import path_images, percentile_mean, step_lengths

# a dev dependency (pyproject): its absence is an install error, not a skipped test; the
# module, not the function torchmetrics re-exports under the same name
tm_ppl = importlib.import_module("torchmetrics.functional.image.perceptual_path_length")
EPS = 1e-4
Z = 8


class Squared(nn.Module):
    """A stand-in perceptual distance: the mean squared difference per image (quadratic in
    the step, as LPIPS is, so that d / eps^2 has a limit)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return (a - b).pow(2).flatten(1).mean(1)


class Generator(nn.Module):
    """G(z) = tanh(W z) as 3 x 4 x 4 images in [-1, 1]; `for_torchmetrics` rescales to
    [0, 255]; `sample` returns the given latents in turn (z1, then z2)."""

    def __init__(self, latents: list[Tensor], for_torchmetrics: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(
            torch.randn(48, Z, generator=g, dtype=torch.float64) / 2, requires_grad=False
        )
        self.latents, self.tm = list(latents), for_torchmetrics

    def forward(self, z: Tensor) -> Tensor:
        images = torch.tanh(z.flatten(1) @ self.w.T).reshape(-1, 3, 4, 4)
        return 255 * (images + 1) / 2 if self.tm else images

    def sample(self, num_samples: int) -> Tensor:
        return self.latents.pop(0)[:num_samples]


def both(
    n: int, method: str, lower: float | None, upper: float | None
) -> tuple[Tensor, np.ndarray]:
    """(torchmetrics' distances after its filter, isodiff's unfiltered d) on n samples."""
    g = torch.Generator().manual_seed(n)
    z1 = torch.randn(n, Z, generator=g, dtype=torch.float64)
    z2 = torch.randn(n, Z, generator=g, dtype=torch.float64)
    _, _, d_tm = tm_ppl.perceptual_path_length(
        Generator([z1, z2], for_torchmetrics=True),
        num_samples=n,
        batch_size=32,
        interpolation_method=method,
        epsilon=EPS,
        resize=None,
        lower_discard=lower,
        upper_discard=upper,
        sim_net=Squared(),
    )
    gen = Generator([])
    if method == "lerp":
        a, b = gen(z1), gen(z1 + EPS * (z2 - z1))
    else:
        a, b = path_images(gen, z1, z2, torch.zeros(n, dtype=torch.float64), EPS)
    d_iso = step_lengths(a, b, {"d": Squared()}, EPS)["d"]
    return d_tm, d_iso


@pytest.mark.parametrize("method", ["lerp", "slerp_any"])
def test_unfiltered_distances_agree(method: str) -> None:
    """d = D(G(z1), G(I(z1, z2, eps))) / eps^2 per sample, the same on both sides."""
    d_tm, d_iso = both(64, method, None, None)
    np.testing.assert_allclose(d_tm.numpy(), d_iso, rtol=1e-9)


def test_filtered_mean_agrees_where_the_percentiles_do() -> None:
    """n = 101: the 1st and 99th percentiles are order statistics 1 and 99 under either
    interpolation rule, so torchmetrics' mean equals isodiff's percentile_mean."""
    d_tm, d_iso = both(101, "slerp_any", 0.01, 0.99)
    assert len(d_tm) == 99
    assert float(d_tm.mean()) == pytest.approx(percentile_mean(d_iso), rel=1e-9)


def test_filtered_mean_differs_by_the_upper_rule_elsewhere() -> None:
    """n = 64: torchmetrics drops everything above the "lower" 99th percentile, isodiff
    keeps up to the "higher" one, one more order statistic."""
    d_tm, d_iso = both(64, "slerp_any", 0.01, 0.99)
    s = np.sort(d_iso)
    kept_tm = s[
        (s >= np.quantile(s, 0.01, method="lower")) & (s <= np.quantile(s, 0.99, method="lower"))
    ]
    assert float(d_tm.mean()) == pytest.approx(kept_tm.mean(), rel=1e-9)
    assert len(d_tm) + 1 == np.count_nonzero(
        (s >= np.percentile(s, 1, method="lower")) & (s <= np.percentile(s, 99, method="higher"))
    )
