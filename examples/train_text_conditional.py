"""Isometric Diffusion for a text-conditional U-Net (Stable-Diffusion-style
UNet2DConditionModel): h is the mid-block output given the text's encoder_hidden_states,
and L_iso regularises x_t -> h for each prompt. The lines isodiff adds are marked `# isodiff`.

A tiny model on toy latents whose "prompts" are class embeddings, so that it runs offline
in seconds; with Stable Diffusion, encoder_hidden_states come from its CLIP text encoder
and x_t are VAE latents, and the same three lines apply.

    python examples/train_text_conditional.py --steps 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from isodiff import Regulariser, h_encoder  # isodiff


def mean_liso(seen: list[float]) -> str:  # isodiff
    """L_iso as printed: its mean over the steps since the last print that had a regularised
    sample (a step's L_iso alone is noisy)."""
    return f"L_iso {sum(seen) / len(seen):.4f} (mean of {len(seen)} steps)" if seen else "L_iso n/a"


def main(argv: list[str] | None = None) -> UNet2DConditionModel:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lambda-iso", type=float, default=1e-4)
    parser.add_argument("--window", type=float, default=0.5, help="L_iso on t >= window * T")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    prompts = torch.nn.Embedding(10, 32)  # stands in for a frozen text encoder
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    iso = Regulariser("spherical")  # isodiff
    T = scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(args.seed)
    seen: list[float] = []  # isodiff: L_iso since the last print
    for step in range(args.steps):
        labels = torch.randint(0, 10, (args.batch_size,), generator=gen)
        latents = (
            torch.randn(args.batch_size, 4, 8, 8, generator=gen) * 0.1
            + labels.view(-1, 1, 1, 1) / 10
        )  # toy latents that depend on the prompt
        with torch.no_grad():
            text = prompts(labels)[:, None]  # (B, tokens = 1, 32)
        noise = torch.randn_like(latents)
        t = torch.randint(0, T, (args.batch_size,), generator=gen)
        x_t = scheduler.add_noise(latents, noise, t)
        loss = mse = F.mse_loss(unet(x_t, t, encoder_hidden_states=text).sample, noise)
        if (m := t >= args.window * T).any():  # isodiff: the regularised timesteps
            l_iso = iso(h_encoder(unet), x_t[m], t[m], encoder_hidden_states=text[m])  # isodiff
            loss = mse + args.lambda_iso * l_iso  # isodiff
            seen.append(l_iso.item())  # isodiff
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} (mse {mse.item():.4f}), {mean_liso(seen)}")
            seen.clear()
    return unet


if __name__ == "__main__":
    main()
