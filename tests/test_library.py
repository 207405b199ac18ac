"""The regulariser as a library: torch-only imports, the hook adapters of diffusers U-Nets,
and equality with the suite's training objective."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel

from isodiff import Regulariser, h_encoder, isometry_loss, sample_timesteps
from isodiff.config import DiffusionConfig
from isodiff.model.diffusion import build_scheduler
from isodiff.train.objective import DiffusionObjective
from tests.conftest import tiny_unet

SUITE_ONLY = ("hydra", "omegaconf", "accelerate", "diffusers", "pandas", "lpips", "cleanfid")


def test_the_core_imports_torch_alone() -> None:
    code = (
        "import sys\nfrom isodiff import Regulariser, h_encoder, isometry_loss, "
        "sample_timesteps\nprint(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(eval(out))  # the printed list of top-level modules
    assert "torch" in loaded and not loaded & set(SUITE_ONLY), loaded & set(SUITE_ONLY)


def test_the_adapter_reads_the_h_of_the_suites_unet() -> None:
    unet = tiny_unet()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 999])
    torch.testing.assert_close(h_encoder(unet)(x, t), unet.encode_h(x, t), rtol=0, atol=0)
    torch.testing.assert_close(h_encoder(unet)(x, 999), unet.encode_h(x, 999), rtol=0, atol=0)


@pytest.mark.parametrize("window", [0.0, 0.5])
def test_the_library_loss_is_the_training_objectives(window: float) -> None:
    """L_iso through h_encoder equals the objective's term on the same batch and probes
    (window 0: every sample regularised, the objective reuses its forward's h)."""
    unet = tiny_unet()
    data = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 3, 16, 16, generator=data).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=data)
    t, mask = sample_timesteps(6, 1000, window, "per_sample", torch.Generator().manual_seed(2))
    scheduler = build_scheduler(DiffusionConfig())
    objective = DiffusionObjective(unet, scheduler, 0.1, Regulariser("spherical"))
    suite = objective(x0, noise, t, mask, generator=torch.Generator().manual_seed(3))["iso"]
    x_t = scheduler.add_noise(x0, noise, t)
    library = Regulariser("spherical")(
        h_encoder(unet), x_t[mask], t[mask], generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(library, suite)
    # and the functional form, with the same probes, is the same number
    functional = isometry_loss(
        lambda x: h_encoder(unet)(x, t[mask]), x_t[mask], generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(functional, suite)


def tiny_condition_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        cross_attention_dim=12,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def test_the_text_conditional_adapter_is_the_mid_block_output() -> None:
    unet = tiny_condition_unet()
    gen = torch.Generator().manual_seed(4)
    x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 12, generator=gen)
    t = torch.tensor([100, 900])
    seen = []
    handle = unet.mid_block.register_forward_hook(lambda m, i, out: seen.append(out))
    unet(x, t, encoder_hidden_states=text)
    handle.remove()
    h = h_encoder(unet)(x, t, encoder_hidden_states=text)
    torch.testing.assert_close(h, seen[0], rtol=0, atol=0)
    # the text changes h, and L_iso of the conditional encoder trains the U-Net's weights
    assert not torch.allclose(h, h_encoder(unet)(x, t, encoder_hidden_states=-text))
    loss = Regulariser("spherical")(
        h_encoder(unet),
        x,
        t,
        encoder_hidden_states=text,
        generator=torch.Generator().manual_seed(5),
    )
    grads = torch.autograd.grad(
        loss, [p for p in unet.parameters() if p.requires_grad], allow_unused=True
    )
    assert torch.isfinite(loss) and sum(g.abs().sum() for g in grads if g is not None) > 0


def test_a_module_without_a_mid_block_is_refused() -> None:
    with pytest.raises(TypeError, match="mid_block"):
        h_encoder(torch.nn.Linear(2, 2))


def _example(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, extra",
    [
        ("train_unconditional", ["--resolution", "16", "--batch-size", "4"]),
        ("train_text_conditional", ["--batch-size", "4"]),
    ],
)
def test_the_examples_train_with_the_regulariser(name: str, extra: list[str]) -> None:
    """Each example runs at toy size, and its L_iso term reaches the weights: the same
    seed with lambda_iso = 0 ends elsewhere."""
    main = _example(name).main
    args = ["--steps", "2", "--window", "0", *extra]
    with_iso = main([*args, "--lambda-iso", "1.0"])
    without = main([*args, "--lambda-iso", "0"])
    moved = [
        not torch.equal(a, b)
        for a, b in zip(with_iso.parameters(), without.parameters(), strict=True)
    ]
    assert any(moved)
