"""The regulariser on peft-LoRA-wrapped models (issue 29, item 3): L_iso's gradient reaches
the adapter weights and nothing else."""

from __future__ import annotations

import pytest
import torch

from isodiff import Regulariser, h_encoder, higher_order_ad
from isodiff.lora import add_lora, lora_parameters
from tests.test_library import tiny_condition_unet
from tests.test_transformers import inputs, tiny

pytest.importorskip("peft")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def trained_adapter(model: torch.nn.Module) -> None:
    """LoRA starts at B = 0, where A has no gradient yet; give B values, as after training."""
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=gen(9))


def check_only_adapters_get_gradient(
    model: torch.nn.Module, loss: torch.Tensor, before_h: tuple[str, ...]
) -> None:
    """After backward: no base weight has a gradient; every LoRA weight of the layers that
    run before h has a non-zero one, those after h (never run) have none."""
    loss.backward()
    lora = lora_parameters(model)
    base = {n: p for n, p in model.named_parameters() if n not in lora}
    assert lora and base
    assert all(not p.requires_grad and p.grad is None for p in base.values())
    ran = {n: p for n, p in lora.items() if n.startswith(before_h)}
    assert ran and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ran.values())
    assert all(p.grad is None for n, p in lora.items() if n not in ran)


def test_lora_unet_trains_only_its_adapters() -> None:
    unet = tiny_condition_unet()
    params = add_lora(unet, rank=8)
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    trained_adapter(unet)
    g = gen(1)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    loss = Regulariser("spherical")(
        h_encoder(unet), x, torch.tensor([600, 900]), encoder_hidden_states=text, generator=gen(2)
    )
    assert torch.isfinite(loss)
    check_only_adapters_get_gradient(unet, loss, ("down_blocks", "mid_block"))


def test_lora_dit_trains_only_its_adapters() -> None:
    model = tiny("dit")  # 4 blocks: h after block 1
    add_lora(model, rank=4)
    trained_adapter(model)
    x, t, condition, _ = inputs("dit")
    loss = Regulariser("euclidean")(h_encoder(model), x, t, generator=gen(3), **condition)
    check_only_adapters_get_gradient(
        model, loss, ("transformer_blocks.0.", "transformer_blocks.1.")
    )


def test_gradient_checkpointing_gives_the_same_gradient_under_higher_order_ad() -> None:
    """A checkpointed LoRA U-Net: L_iso's adapter gradient, the backward run under
    higher_order_ad (the replayed attention must be L_iso's math kernel), equals the
    gradient without checkpointing."""
    g = gen(7)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    t = torch.tensor([600, 900])
    grads = []
    for checkpointing in (False, True):
        unet = tiny_condition_unet()
        params = add_lora(unet, rank=4)
        trained_adapter(unet)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        loss = Regulariser("spherical")(
            h_encoder(unet), x, t, encoder_hidden_states=text, generator=gen(8)
        )
        with higher_order_ad():
            grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_the_adapter_changes_h_and_peft_wrapped_models_work() -> None:
    """LoRA weights change h (the adapted layers are the ones h_encoder runs), and a model
    wrapped by peft's own get_peft_model is encoded the same way."""
    from peft import LoraConfig, get_peft_model

    unet = tiny_condition_unet()
    g = gen(4)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    t = torch.tensor([600, 900])
    with torch.no_grad():
        plain = h_encoder(unet)(x, t, encoder_hidden_states=text)
        wrapped = get_peft_model(unet, LoraConfig(r=8, target_modules=["to_q", "to_v"]))
        torch.testing.assert_close(h_encoder(wrapped)(x, t, encoder_hidden_states=text), plain)
        trained_adapter(wrapped)
        assert not torch.allclose(h_encoder(wrapped)(x, t, encoder_hidden_states=text), plain)


def test_the_lora_example_fine_tunes_saves_and_reloads(tmp_path, monkeypatch) -> None:
    """examples/train_lora.py at toy size: only the adapter moves, L_iso changes where it
    goes, and diffusers' own save_lora_weights / load_lora_adapter round-trip it."""
    from tests.test_library import _example

    module = _example("train_lora")
    args = ["--steps", "2", "--batch-size", "2", "--window", "0", "--lr", "1e-2"]
    out = tmp_path / "lora"
    with_iso = module.main(
        [*args, "--lambda-iso", "1.0", "--output-dir", str(out), "--gradient-checkpointing"]
    )
    without = module.main([*args, "--lambda-iso", "0"])
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    base = module.base_unet(module.argparse.Namespace(pretrained=None, seed=0))
    frozen = {n: p for n, p in with_iso.named_parameters() if ".lora_" not in n}
    assert all(
        torch.equal(p, dict(base.named_parameters())[n.replace(".base_layer", "")])
        for n, p in frozen.items()
    )
    lora_a, lora_b = lora_parameters(with_iso), lora_parameters(without)
    assert len(lora_a) and any(not torch.equal(lora_a[n], lora_b[n]) for n in lora_a)
    assert all(".lora_A." in n or ".lora_B." in n for n in lora_a)
    assert {p.shape[0] for n, p in lora_a.items() if ".lora_A." in n} == {8}  # rank 8
    reloaded = module.reload(str(out), module.argparse.Namespace(pretrained=None, seed=0))
    g = gen(6)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 1, 32, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        trained = with_iso(x, t, encoder_hidden_states=text).sample
        torch.testing.assert_close(reloaded(x, t, encoder_hidden_states=text).sample, trained)
        assert not torch.allclose(base(x, t, encoder_hidden_states=text).sample, trained)


@pytest.mark.parametrize("setting", ["dit_flow", "lora_unet"])
def test_the_backbone_bench_reports_a_step_cost_ratio(setting: str) -> None:
    from benchmarks.backbones import step_cost

    row = step_cost(setting, repeats=1)
    assert row["plain_s"] > 0 and row["iso_s"] > 0
    assert row["ratio"] == pytest.approx(row["iso_s"] / row["plain_s"]) and row["ratio"] > 1
