"""HUNet's split paths equal diffusers' own forward; checkpoints load offline."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from isodiff.config import ModelConfig
from isodiff.errors import ConfigError
from isodiff.isometry import higher_order_ad
from isodiff.model.unet import HUNet, build_unet, init_unet, load_unet, unet_kwargs
from tests.conftest import tiny_model, tiny_unet

TINY = tiny_model()


@pytest.fixture(scope="module")
def unet() -> HUNet:
    return tiny_unet()


def _inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.tensor([0, 500, 999][:batch])


def test_eps_equals_diffusers_forward(unet: HUNet) -> None:
    x, t = _inputs()
    reference = UNet2DModel.forward(unet, x, t).sample
    eps, h = unet.eps_and_h(x, t)
    torch.testing.assert_close(eps, reference, rtol=0, atol=1e-6)
    assert h.shape == (3, 32, 8, 8)


def test_encode_h_equals_mid_block_output_of_full_forward(unet: HUNet) -> None:
    x, t = _inputs()
    captured = {}
    hook = unet.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    UNet2DModel.forward(unet, x, t)
    hook.remove()
    torch.testing.assert_close(unet.encode_h(x, t), captured["h"], rtol=0, atol=0)


def test_h_injection(unet: HUNet) -> None:
    x, t = _inputs()
    eps, h = unet.eps_and_h(x, t)
    torch.testing.assert_close(unet.eps_and_h(x, t, h_replace=h)[0], eps, rtol=0, atol=0)
    torch.testing.assert_close(unet.eps_and_h(x, t, h_offset=torch.zeros_like(h))[0], eps)
    edited, h_out = unet.eps_and_h(x, t, h_offset=torch.randn_like(h))
    assert not torch.allclose(edited, eps) and torch.equal(h_out, h)


def test_scalar_timestep_broadcasts(unet: HUNet) -> None:
    x, _ = _inputs()
    torch.testing.assert_close(unet.encode_h(x, 500), unet.encode_h(x, torch.full((3,), 500)))


def test_attention_supports_double_backward_and_forward_ad(unet: HUNet) -> None:
    x, t = _inputs(2)
    x.requires_grad_(True)
    v = torch.randn_like(x)
    with higher_order_ad():
        h = unet.encode_h(x, t)
        u = torch.zeros_like(h, requires_grad=True)
        (jtu,) = torch.autograd.grad(h, x, u, create_graph=True)
        (jv,) = torch.autograd.grad(jtu, u, v, create_graph=True)  # J v by double backward
        _, jv_forward = torch.func.jvp(lambda y: unet.encode_h(y, t), (x.detach(),), (v,))
        (grad_w,) = torch.autograd.grad(jv.square().sum(), unet.mid_block.attentions[0].to_q.weight)
    torch.testing.assert_close(jv, jv_forward, rtol=1e-4, atol=1e-5)
    assert grad_w.abs().sum() > 0


def test_save_and_load_round_trip(unet: HUNet, tmp_path) -> None:
    unet.save_pretrained(tmp_path / "ckpt")
    loaded = load_unet(str(tmp_path / "ckpt"))
    assert isinstance(loaded, HUNet)
    for a, b in zip(loaded.state_dict().values(), unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # A plain diffusers checkpoint (e.g. google/ddpm-*) in a unet/ subfolder loads too.
    UNet2DModel(**unet_kwargs(TINY)).save_pretrained(tmp_path / "pipe" / "unet")
    assert isinstance(init_unet(TINY, str(tmp_path / "pipe")), HUNet)


def test_init_from_errors_are_clear(unet: HUNet, tmp_path) -> None:
    with pytest.raises(ConfigError, match="init_from='/nowhere/at/all' was not found"):
        init_unet(TINY, "/nowhere/at/all")
    with pytest.raises(ConfigError, match="huggingface-cli download"):
        init_unet(TINY, "google/not-in-the-cache")
    unet.save_pretrained(tmp_path / "ckpt")
    other = ModelConfig(sample_size=16, block_out_channels=[8, 16])
    with pytest.raises(ConfigError, match="does not match model=tiny.*block_out_channels"):
        init_unet(other, str(tmp_path / "ckpt"))


@pytest.mark.slow
def test_ddpm_256_matches_the_paper_architecture(tmp_path) -> None:
    from isodiff.config import to_train_config
    from tests.conftest import compose_train

    cfg = to_train_config(compose_train(["tier=paper", "init_from=/x", "data.root=/x"], tmp_path))
    unet = build_unet(cfg.model)
    assert sum(p.numel() for p in unet.parameters()) == 113_673_219
    with torch.no_grad():
        h = unet.encode_h(torch.zeros(1, 3, 256, 256), 999)
    assert h.shape == (1, 512, 8, 8)
