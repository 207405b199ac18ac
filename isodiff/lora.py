"""LoRA fine-tuning with the regulariser: the base model frozen, L_iso training the adapters.

The regulariser needs nothing LoRA-specific: peft replaces a model's linear layers by LoRA
layers in place, so `h_encoder(model)` finds the same mid block (or transformer blocks) and
differentiates through the adapted layers; with the base weights frozen
(requires_grad=False), autograd takes the double backward of L_iso to the adapter weights
alone. `add_lora` sets that up as diffusers' train_text_to_image_lora.py does (rank 8, the
attention projections, Gaussian A and zero B, alpha = rank); `lora_parameters` lists what
trains; `merged_state_dict` is the plain model's weights with the adapter merged in. peft
(the `lora` extra) is imported only when `add_lora` or `merged_state_dict` is called.

Gradient checkpointing (`model.enable_gradient_checkpointing()`, common in LoRA fine-tunes)
works with L_iso when the whole step (the main forward, L_iso and the backward) runs under
`higher_order_ad()`: checkpointed blocks replay their forward during the backward with the
attention kernel then in force, and torch.utils.checkpoint raises CheckpointError when the
replay's kernel differs from the forward's; L_iso's double backward needs the math kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

# The attention projections of diffusers' U-Nets and transformers (DiT, PixArt, SD3, Flux),
# the targets of diffusers' LoRA training scripts.
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: Sequence[str] = LORA_TARGETS,
    adapter_name: str = "default",
) -> list[nn.Parameter]:
    """Freeze `model` and add a peft LoRA adapter (diffusers' `add_adapter`, or peft's
    `inject_adapter_in_model` for models without it); returns the adapter's parameters, the
    only ones left trainable. alpha: rank when None (scale 1)."""
    from peft import LoraConfig, inject_adapter_in_model  # the `lora` extra, needed only here

    model.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    if hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin: save/load_lora_adapter
        model.add_adapter(config, adapter_name=adapter_name)
    else:  # models without the mixin (DiTTransformer2DModel): peft directly
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    return [p for _, p in lora_parameters(model).items()]


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's LoRA weights by name (peft's `lora_A` / `lora_B` and their embeddings)."""
    return {name: p for name, p in model.named_parameters() if ".lora_" in name}


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of `model` without its LoRA layers, each adapted weight replaced by
    base + scale * B A (peft's get_delta_weight, of the active adapters): loadable, strict,
    into the model's class built without adapters. The model is left as it is; every tensor
    that no adapter touches is a bitwise copy of the model's."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # the `lora` extra, needed only here

    deltas: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and module.active_adapters:
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            deltas[f"{name}.base_layer.weight"] = delta
    merged = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        value = value.detach().clone()
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        merged[key.replace(".base_layer.", ".")] = value
    return merged
