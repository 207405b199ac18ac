"""h for diffusion transformers (issue 29, item 1): tiny diffusers DiT, PixArt, SD3 and Flux
regularised through the public API alone (`from isodiff import ...`), with the estimator
checked exact against full Jacobians."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)
from torch import nn
from torch.autograd.functional import jacobian

from isodiff import (
    Regulariser,
    h_encoder,
    higher_order_ad,
    isometry_loss_from_h,
    recording_h,
    transformer_blocks,
)

B, TEXT, WIDTH = 2, 5, 16  # batch, text tokens, inner width (2 heads x 8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A few blocks of each class at small dims (4 latent channels, 8 x 8, patch 2: 16 tokens)."""
    torch.manual_seed(0)
    common = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4)
    if name == "dit":
        model = DiTTransformer2DModel(
            **common,
            num_layers=4,
            norm_num_groups=4,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        )
    elif name == "pixart":
        model = PixArtTransformer2DModel(
            **common,
            num_layers=3,
            norm_num_groups=4,
            cross_attention_dim=WIDTH,
            sample_size=8,
            patch_size=2,
            caption_channels=12,
        )
    elif name == "sd3":
        model = SD3Transformer2DModel(
            **common,
            num_layers=3,
            sample_size=8,
            patch_size=2,
            joint_attention_dim=12,
            caption_projection_dim=WIDTH,
            pooled_projection_dim=6,
            pos_embed_max_size=8,
        )
    elif name == "flux":  # 1 double-stream + 4 single-stream blocks: the middle is single[1]
        model = FluxTransformer2DModel(
            **common,
            patch_size=1,
            num_layers=1,
            num_single_layers=4,
            joint_attention_dim=12,
            pooled_projection_dim=6,
            axes_dims_rope=(2, 2, 4),
        )
    else:
        raise ValueError(name)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def inputs(
    name: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """(x_t, t, condition sliced with the batch, shared condition) for each model."""
    g = gen(1)
    text = torch.randn(B, TEXT, 12, generator=g, dtype=dtype)
    pooled = torch.randn(B, 6, generator=g, dtype=dtype)
    if name == "flux":  # packed latents (B, 16 tokens, 4) and flow time in [0, 1]
        ids = {
            "img_ids": torch.zeros(16, 3, dtype=dtype),
            "txt_ids": torch.zeros(TEXT, 3, dtype=dtype),
        }
        ids["img_ids"][:, 1] = torch.arange(16, dtype=dtype) // 4
        ids["img_ids"][:, 2] = torch.arange(16, dtype=dtype) % 4
        return (
            torch.randn(B, 16, 4, generator=g, dtype=dtype),
            torch.tensor([0.3, 0.9]),
            {"encoder_hidden_states": text, "pooled_projections": pooled},
            ids,
        )
    x = torch.randn(B, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.tensor([300.0, 900.0])
    condition = {
        "dit": {"class_labels": torch.tensor([1, 7])},
        "pixart": {"encoder_hidden_states": text},
        "sd3": {"encoder_hidden_states": text, "pooled_projections": pooled},
    }[name]
    return x, t, condition, {}


def blocks_of(model: nn.Module) -> list[nn.Module]:
    return [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]


MODELS = ["dit", "pixart", "sd3", "flux"]


@pytest.mark.parametrize("name", MODELS)
def test_h_is_the_middle_blocks_image_tokens_and_the_forward_stops_there(name: str) -> None:
    model = tiny(name)
    x, t, condition, shared = inputs(name)
    blocks = blocks_of(model)
    middle = (len(blocks) - 1) // 2
    calls = [0] * len(blocks)
    seen: list[torch.Tensor] = []
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda m, a, out, i=i: calls.__setitem__(i, calls[i] + 1))
    blocks[middle].register_forward_hook(
        lambda m, a, out: seen.append(out if isinstance(out, torch.Tensor) else out[-1])
    )
    with torch.no_grad():
        model(x, timestep=t, **condition, **shared)  # the full forward, for reference
        assert calls == [1] * len(blocks)
        h = h_encoder(model, shared=shared)(x, t, **condition)
    assert h.shape == (B, 16, WIDTH)  # (batch, image tokens, width)
    torch.testing.assert_close(h, seen[0], rtol=0, atol=0)
    # the forward stopped at h: the middle block and those before it ran a second time,
    # the later blocks did not
    assert calls == [2] * (middle + 1) + [1] * (len(blocks) - middle - 1)
    if name == "flux":  # the middle of the concatenation is the second single-stream block
        assert blocks[middle] is model.single_transformer_blocks[1]
    # the conditioning reaches h
    other = {k: (v + 1 if k != "class_labels" else v.flip(0)) for k, v in condition.items()}
    with torch.no_grad():
        assert not torch.allclose(h, h_encoder(model, shared=shared)(x, t, **other))


@pytest.mark.parametrize("name", MODELS)
def test_the_regulariser_trains_each_transformer(name: str) -> None:
    model = tiny(name)
    x, t, condition, shared = inputs(name)
    loss = Regulariser("spherical")(
        h_encoder(model, shared=shared), x, t, generator=gen(2), **condition
    )
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    params = dict(model.named_parameters())
    grads = dict(
        zip(
            params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True
        )
    )
    assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0
    # only what runs before h is trained: the output head gets no gradient
    head = [n for n in params if n.startswith("proj_out")]
    assert head and all(grads[n] is None for n in head)


def test_the_block_index_is_configurable() -> None:
    model = tiny("dit")
    x, t, condition, _ = inputs("dit")
    with torch.no_grad():
        first = h_encoder(model, 0)(x, t, **condition)
        middle = h_encoder(model)(x, t, **condition)
        last = h_encoder(model, -1)(x, t, **condition)
        assert torch.equal(middle, h_encoder(model, 1)(x, t, **condition))  # 4 blocks: index 1
    assert not torch.allclose(first, middle) and not torch.allclose(middle, last)
    with pytest.raises(IndexError):
        h_encoder(model, 4)
    wrapper = nn.Module()
    wrapper.blocks = model.transformer_blocks  # other models: name their block list
    assert len(transformer_blocks(wrapper, ("blocks",))) == 4
    with pytest.raises(TypeError, match="transformer blocks"):
        h_encoder(nn.Linear(2, 2))
    from tests.test_library import tiny_condition_unet

    with pytest.raises(TypeError, match="mid_block"):
        h_encoder(tiny_condition_unet(), 0)


def test_the_estimator_is_exact_against_the_full_jacobian() -> None:
    """With the n scaled basis vectors sqrt(n) e_i as probes, the Hutchinson sums are the
    traces themselves: L_iso from `isometry_loss_from_h` equals the ratio of traces of
    J^T J (euclidean) and P J^T J P (spherical), J from torch.autograd.functional.jacobian
    of the middle-block map of a tiny DiT, to float64 rounding."""
    model = tiny("dit", torch.float64)
    x, t, condition, _ = inputs("dit", torch.float64)
    encode = h_encoder(model)
    n = x[0].numel()
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, *x.shape[1:]) * n**0.5
    probes = basis.expand(n, *x.shape).clone()
    jac = torch.stack(
        [
            jacobian(
                lambda xi, i=i: encode(
                    xi[None], t[i : i + 1], class_labels=condition["class_labels"][i : i + 1]
                )[0],
                x[i],
            ).reshape(-1, n)
            for i in range(B)
        ]
    )
    for metric in ("euclidean", "spherical"):
        m = jac.transpose(1, 2) @ jac
        if metric == "spherical":
            xh = x.flatten(1) / x.flatten(1).norm(dim=1, keepdim=True)
            p = torch.eye(n, dtype=torch.float64) - xh[:, :, None] * xh[:, None, :]
            m = p @ m @ p
        tr = torch.diagonal(m, dim1=1, dim2=2).sum(1)
        tr2 = (m * m.transpose(1, 2)).sum((1, 2))
        exact = tr2.mean() / tr.mean() ** 2
        point = x.clone().requires_grad_()
        with higher_order_ad():  # attention differentiated twice
            estimate = isometry_loss_from_h(
                encode(point, t, **condition), point, probes, metric=metric
            )
        torch.testing.assert_close(estimate, exact, rtol=1e-9, atol=0)
        assert exact > 1 / n  # a random DiT is no isometry


def test_pixart_alpha_added_conditions_are_sliced_with_the_batch() -> None:
    """PixArt-alpha's resolution and aspect-ratio conditions come as a dict
    (added_cond_kwargs); the Regulariser slices its tensors with the batch."""
    torch.manual_seed(0)
    # width 24: the size embedding splits the width in three
    model = PixArtTransformer2DModel(
        num_attention_heads=3,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        cross_attention_dim=24,
        sample_size=8,
        patch_size=2,
        caption_channels=12,
        use_additional_conditions=True,
    ).eval()
    x, t, condition, _ = inputs("pixart")
    added = {
        "resolution": torch.tensor([[64.0, 64.0], [64.0, 96.0]]),
        "aspect_ratio": torch.tensor([[1.0], [1.5]]),
    }
    reg = Regulariser("spherical", batch_fraction=0.5)  # the first sample only
    loss = reg(h_encoder(model), x, t, generator=gen(3), added_cond_kwargs=added, **condition)
    first = {k: v[:1] for k, v in added.items()}
    alone = Regulariser("spherical")(
        h_encoder(model),
        x[:1],
        t[:1],
        generator=gen(3),
        added_cond_kwargs=first,
        **{k: v[:1] for k, v in condition.items()},
    )
    torch.testing.assert_close(loss, alone)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["sd3", "unet"])
def test_recording_h_sees_the_encoders_h_in_a_full_forward(name: str) -> None:
    """recording_h leaves the forward whole and records the h that h_encoder returns."""
    from tests.test_library import tiny_condition_unet

    if name == "unet":
        model, g = tiny_condition_unet(), gen(8)
        x, t = torch.randn(B, 4, 8, 8, generator=g), torch.tensor([100, 900])
        condition = {"encoder_hidden_states": torch.randn(B, TEXT, 12, generator=g)}
        call = lambda: model(x, t, **condition)  # noqa: E731
    else:
        model = tiny(name)
        x, t, condition, _ = inputs(name)
        call = lambda: model(x, timestep=t, **condition)  # noqa: E731
    with torch.no_grad():
        with recording_h(model) as seen:
            out = call().sample
        assert out.shape[0] == B and len(seen) == 1
        torch.testing.assert_close(seen[0], h_encoder(model)(x, t, **condition), rtol=0, atol=0)
        call()
    assert len(seen) == 1  # the hook is gone after the block
