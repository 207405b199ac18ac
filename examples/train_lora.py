"""Isometric Diffusion as a LoRA fine-tune of a Stable-Diffusion-shaped U-Net (the
Smooth-LoRA setting: rank 8): the core of diffusers'
examples/text_to_image/train_text_to_image_lora.py (frozen UNet2DConditionModel, a peft
LoRA adapter on the attention projections, AdamW on the adapter alone, the adapter saved with
`save_lora_weights`), with the lines isodiff adds marked `# isodiff`. L_iso's gradient reaches
the adapter weights alone, as the loss's does.

A tiny U-Net with SD 1.5's block layout (three cross-attention down blocks, a plain one, the
mirror on the way up) on toy latents whose "prompts" are class embeddings, so that it runs
offline in seconds; with Stable Diffusion: `--pretrained runwayml/stable-diffusion-v1-5`-style
weights (subfolder unet), CLIP text states and VAE latents, and the same lines apply. The
saved adapter loads with `StableDiffusionPipeline.load_lora_weights(output_dir)` or, on the
U-Net alone, with `reload` (diffusers' `load_lora_adapter`).

    python examples/train_lora.py --steps 2 --output-dir lora-iso       # toy size, seconds
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from isodiff import Regulariser, h_encoder, higher_order_ad  # isodiff


def base_unet(args: argparse.Namespace) -> UNet2DConditionModel:
    """The model to fine-tune: pretrained weights, or a seeded tiny SD-shaped U-Net."""
    if args.pretrained:
        return UNet2DConditionModel.from_pretrained(args.pretrained, subfolder="unet")
    torch.manual_seed(args.seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 16, 32, 32),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def reload(output_dir: str, args: argparse.Namespace) -> UNet2DConditionModel:
    """The base U-Net with the saved adapter loaded by diffusers' `load_lora_adapter`."""
    unet = base_unet(args)
    unet.load_lora_adapter(output_dir, prefix="unet", use_safetensors=True)
    return unet


def mean_liso(seen: list[float]) -> str:  # isodiff
    """L_iso as printed: its mean over the steps since the last print that had a regularised
    sample (a step's L_iso alone is noisy)."""
    return f"L_iso {sum(seen) / len(seen):.4f} (mean of {len(seen)} steps)" if seen else "L_iso n/a"


def main(argv: list[str] | None = None) -> UNet2DConditionModel:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", default=None, help="a Stable Diffusion folder or hub id")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lambda-iso", type=float, default=1e-4)
    parser.add_argument("--window", type=float, default=0.5, help="L_iso on t >= window * T")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    unet = base_unet(args)
    unet.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    size, channels = unet.config.sample_size, unet.config.in_channels
    text_dim = unet.config.cross_attention_dim
    torch.manual_seed(args.seed)
    prompts = torch.nn.Embedding(10, text_dim)  # stands in for the frozen text encoder
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(lora_layers, lr=args.lr)
    iso = Regulariser("spherical")  # isodiff
    # isodiff: checkpointed blocks replay their forward in the backward, with the attention
    # kernel then in force; L_iso needs the math kernel, so the whole step uses it
    attention = higher_order_ad if args.gradient_checkpointing else contextlib.nullcontext
    T = scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(args.seed)
    seen: list[float] = []  # isodiff: L_iso since the last print
    for step in range(args.steps):
        labels = torch.randint(0, 10, (args.batch_size,), generator=gen)
        latents = torch.randn(args.batch_size, channels, size, size, generator=gen) * 0.1 + (
            labels.view(-1, 1, 1, 1) / 10
        )  # toy latents that depend on the prompt
        with torch.no_grad():
            text = prompts(labels)[:, None]  # (B, tokens = 1, text_dim)
        noise = torch.randn_like(latents)
        t = torch.randint(0, T, (args.batch_size,), generator=gen)
        x_t = scheduler.add_noise(latents, noise, t)
        with attention():  # isodiff
            loss = mse = F.mse_loss(
                unet(x_t, t, encoder_hidden_states=text).sample.float(), noise.float()
            )
            if (m := t >= args.window * T).any():  # isodiff: the regularised timesteps
                l_iso = iso(h_encoder(unet), x_t[m], t[m], encoder_hidden_states=text[m])
                loss = mse + args.lambda_iso * l_iso  # isodiff
                seen.append(l_iso.item())  # isodiff
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} (mse {mse.item():.4f}), {mean_liso(seen)}")
            seen.clear()
    if args.output_dir:
        unet_lora_state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            save_directory=args.output_dir,
            unet_lora_layers=unet_lora_state_dict,
            safe_serialization=True,
        )
    return unet


if __name__ == "__main__":
    main()
