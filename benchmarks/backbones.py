"""Step cost of the regulariser on today's backbones (issue 29, item 6): the ratio of one
training step's time with L_iso to the plain step's, for

- dit_flow: a small class-conditional DiTTransformer2DModel (6 blocks, width 64, 16 x 16 x 3,
  patch 2) trained by flow matching (`isodiff.flow.flow_matching_loss`), batch 16;
- lora_unet: a small Stable-Diffusion-shaped UNet2DConditionModel (the LoRA example's) with a
  rank-8 LoRA adapter on the attention projections, base frozen, eps-MSE, batch 8;
- sd15_lora (CUDA): an SD-1.5-sized UNet2DConditionModel (random weights, 64 x 64 x 4
  latents, 77 x 768 text states) with a rank-8 adapter, bf16, batch 2.

A step is forward + backward of the loss (the optimizer step, the same in both, is left
out); iso regularises every sample (lambda_iso = 1, spherical, one probe) with the main
forward's h (`recording_h`, as `flow_matching_loss` does), its attention in the math kernel
for the double backward. Time: the minimum over the repeats
after one warm-up; on CPU the process's CPU time with one intra-op thread (not inflated by
other processes on a shared machine), on CUDA wall time between synchronisations. Unlike
benchmarks.train_step, everything runs in one process and memory is reported only on CUDA (peak
allocated).

    python -m benchmarks.backbones [--settings dit_flow,lora_unet] [--out results/bench]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from isodiff.adapters import h_encoder, recording_h
from isodiff.flow import flow_matching_loss
from isodiff.isometry import Regulariser, higher_order_ad
from isodiff.lora import add_lora

SETTINGS = ("dit_flow", "lora_unet", "sd15_lora")
Step = Callable[[bool], torch.Tensor]  # iso? -> the loss of one batch


def _to(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """model on device in dtype (no cast for float32: diffusers warns on any `to(dtype)`)."""
    model.to(device)
    return model if dtype == torch.float32 else model.to(dtype)


def _dit_flow(device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Step]:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=3,
        out_channels=3,
        num_layers=6,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    model = _to(model, device, dtype)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 3, 16, 16, generator=g).to(device, dtype)
    noise = torch.randn(x0.shape, generator=g).to(device, dtype)
    t = torch.rand(16, generator=g).to(device)
    labels = torch.randint(0, 10, (16,), generator=g).to(device)
    reg = Regulariser("spherical")

    def step(iso: bool) -> torch.Tensor:
        return flow_matching_loss(
            model,
            x0,
            noise,
            t,
            lambda_iso=1.0 if iso else 0.0,
            regulariser=reg,
            generator=torch.Generator().manual_seed(2),
            class_labels=labels,
        )["loss"]

    return model, step


def _lora_step(
    unet: nn.Module, batch: int, text_tokens: int, device: torch.device, dtype: torch.dtype
) -> Step:
    """eps-MSE (+ L_iso) of a LoRA-adapted UNet2DConditionModel on random latents."""
    add_lora(unet, rank=8)
    _to(unet, device, dtype)
    cfg = unet.config
    g = torch.Generator().manual_seed(1)
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x_t = torch.randn(shape, generator=g).to(device, dtype)
    noise = torch.randn(shape, generator=g).to(device, dtype)
    text = torch.randn(batch, text_tokens, cfg.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.randint(500, 1000, (batch,), generator=g).to(device)
    reg = Regulariser("spherical")

    def step(iso: bool) -> torch.Tensor:
        x = x_t.detach().requires_grad_(iso)
        with contextlib.ExitStack() as stack:
            if iso:  # the main forward's h, differentiated twice (as flow_matching_loss does)
                stack.enter_context(higher_order_ad())
                seen = stack.enter_context(recording_h(unet))
            pred = unet(x, t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred.float(), noise.float())
        if iso:
            loss = loss + reg(
                h_encoder(unet), x, t, h=seen[0], generator=torch.Generator().manual_seed(2)
            )
        return loss

    return step


def _lora_unet(device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Step]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
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
    return unet, _lora_step(unet, 8, 1, device, dtype)


def _sd15_lora(device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Step]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5's shapes
    return unet, _lora_step(unet, 2, 77, device, dtype)


BUILDERS = {"dit_flow": _dit_flow, "lora_unet": _lora_unet, "sd15_lora": _sd15_lora}


def _time(step: Step, iso: bool, device: torch.device, repeats: int) -> tuple[float, float]:
    """(min seconds over `repeats` after a warm-up, peak CUDA bytes or 0) of forward+backward."""
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = clock()
        step(iso).backward()
        if cuda:
            torch.cuda.synchronize(device)
        if i:  # the first run warms up (allocator, kernels, lazy init)
            times.append(clock() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    return min(times), float(peak)


def step_cost(
    setting: str, device: str = "cpu", repeats: int = 3, dtype: torch.dtype | None = None
) -> dict[str, float | str]:
    """{plain_s, iso_s, ratio = iso_s / plain_s, ...} for one setting (see the module)."""
    dev = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if setting == "sd15_lora" else torch.float32
    previous = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)  # CPU time of one thread: comparable on a shared machine
    try:
        model, step = BUILDERS[setting](dev, dtype)
        plain, plain_peak = _time(step, False, dev, repeats)
        model.zero_grad(set_to_none=True)
        iso, iso_peak = _time(step, True, dev, repeats)
    finally:
        torch.set_num_threads(previous)
    row: dict[str, float | str] = {
        "setting": setting,
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "plain_s": plain,
        "iso_s": iso,
        "ratio": iso / plain,
    }
    if dev.type == "cuda":
        row.update(
            device_name=torch.cuda.get_device_name(dev),
            plain_peak_gib=plain_peak / 2**30,
            iso_peak_gib=iso_peak / 2**30,
        )
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--settings", default="dit_flow,lora_unet", help=f"comma-separated, of {','.join(SETTINGS)}"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for backbones.json")
    args = parser.parse_args(argv)
    rows = []
    for setting in args.settings.split(","):
        rows.append(step_cost(setting, args.device, args.repeats))
        row = rows[-1]
        print(
            f"{setting:10s} {row['device']} {row['dtype']}: plain {row['plain_s']:.4f} s, "
            f"iso {row['iso_s']:.4f} s, iso / plain {row['ratio']:.2f}",
            flush=True,
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "backbones.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
