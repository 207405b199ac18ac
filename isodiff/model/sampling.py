"""Deterministic DDIM from x_T, DDIM inversion and Asyrp h-editing, with per-sample seeds;
for a rectified-flow model (`diffusion.objective=flow`) the Euler ODE of its velocity field.

One loop serves every use (metrics, inversion, editing): DDIM with eta = 0 in fp32 on the
timesteps of diffusers' DDIMScheduler (`build_ddim`), batched, optionally recording h at
every step. The update is written out (`ddim_step`) rather than delegated to
`DDIMScheduler.step` because Asyrp's asymmetric process needs two epsilons in one step;
tests check it against DDIMScheduler and DDIMInverseScheduler.

`FlowEuler` runs the same loop on the sigmas and timesteps of diffusers'
FlowMatchEulerDiscreteScheduler (shift 1: sigma from 1 to 1/T, then 0), with its Euler step
x' = x + (sigma' - sigma) v (`flow_step`); inversion is the same ODE run from sigma = 0 up,
each step with the network at the step's timestep, as DDIM inversion is. `build_sampler`
picks the sampler of a run's diffusion.objective, `SAMPLERS` names it in a protocol.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from isodiff.config import DiffusionConfig, Objective
from isodiff.errors import ConfigError
from isodiff.model.diffusion import build_ddim, build_flow_scheduler
from isodiff.model.seeding import generator
from isodiff.model.unet import HUNet


class SampleRNG:
    """One generator per sample, seeded by (seed, i): sample i draws the same numbers
    whatever the batch it lands in (EDM's StackedRandomGenerator)."""

    def __init__(self, seed: int, indices: Sequence[int]) -> None:
        self.generators = [generator(seed, int(i)) for i in indices]

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.rand(shape, generator=g) for g in self.generators])


def latents(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """x_T ~ N(0, I) of samples `indices` (CPU, float32): sample i from generator (seed, i)."""
    return SampleRNG(seed, indices).randn(*shape)


@dataclass(frozen=True)
class DDIMSchedule:
    """Step k maps x at noise level alpha_bar[k] to alpha_bar_prev[k], with the network
    evaluated at timesteps[k] (T -> 0); alpha_bar_prev of the last step is 1 (x_0)."""

    timesteps: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor


def ddim_schedule(cfg: DiffusionConfig, steps: int) -> DDIMSchedule:
    """DDIMScheduler's timesteps and its rule for the previous timestep (DDIM Eq. 12)."""
    scheduler = build_ddim(cfg)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.long()
    prev = timesteps - cfg.num_train_timesteps // steps
    alphas = scheduler.alphas_cumprod.double()
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    alpha_bar_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)
    return DDIMSchedule(timesteps, alphas[timesteps], alpha_bar_prev)


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar: float,
    alpha_bar_next: float,
    eps_direction: torch.Tensor | None = None,
    clip: bool = False,
) -> torch.Tensor:
    """One deterministic DDIM move from level alpha_bar to alpha_bar_next (DDIM Eq. 12,
    eta = 0); towards higher noise it is DDIM inversion.

    x0 = (x - sqrt(1 - a) eps) / sqrt(a);  x' = sqrt(a') x0 + sqrt(1 - a') eps_direction.
    Asyrp's asymmetric process predicts x0 with the edited eps and keeps the model's own eps
    for the direction (`eps_direction`); otherwise both are `eps`. clip clamps x0 to [-1, 1]
    and keeps the unclipped eps for the direction, as DDIMScheduler(clip_sample=True).
    """
    eps_direction = eps if eps_direction is None else eps_direction
    x0 = (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    return alpha_bar_next**0.5 * x0 + (1 - alpha_bar_next) ** 0.5 * eps_direction


@dataclass(frozen=True)
class FlowSchedule:
    """Step k moves x from sigma[k] to sigma_next[k] (1 -> 0) with the network evaluated at
    timesteps[k] = sigma[k] T (floats); sigma_next of the last step is 0 (x_0)."""

    timesteps: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor


def flow_schedule(cfg: DiffusionConfig, steps: int) -> FlowSchedule:
    """FlowMatchEulerDiscreteScheduler's timesteps and sigmas for `steps` steps."""
    scheduler = build_flow_scheduler(cfg)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double()
    return FlowSchedule(scheduler.timesteps.double(), sigmas[:-1], sigmas[1:])


def flow_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    v_direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Euler move of dx/dsigma = v from sigma to sigma_next (towards higher noise it is
    the inversion), FlowMatchEulerDiscreteScheduler.step's x + (sigma_next - sigma) v.

    With `v_direction` (Asyrp's asymmetric process, as `ddim_step`): x0 is predicted from
    the edited v, x0 = x - sigma v, the noise from the model's own, n = x + (1 - sigma)
    v_direction, and x' = (1 - sigma_next) x0 + sigma_next n; with v_direction = v this is
    the Euler step.
    """
    if v_direction is None:
        return x + (sigma_next - sigma) * v
    return (1 - sigma_next) * (x - sigma * v) + sigma_next * (x + (1 - sigma) * v_direction)


@dataclass(frozen=True)
class HEdit:
    """An edit of h on the steps with t >= t_edit (Asyrp): h + offset, or h replaced.

    offset: (N or 1, *h shape or D), the same on every edited step; step_offset: (S, N or 1,
    *h shape or D), one offset per step (directions fitted on each step's h); replace: (S, N,
    *h shape or D), one h per step, e.g. the `Trajectory.h` of another run. Per-step tensors
    are indexed by the step k of the schedule (k = 0 at t = T), the order `Trajectory.h`
    records. Given together: replace, then offset, then step_offset.
    """

    offset: torch.Tensor | None = None
    replace: torch.Tensor | None = None
    t_edit: int = 0
    step_offset: torch.Tensor | None = None

    def apply(self, h: torch.Tensor, step: int, rows: slice) -> torch.Tensor:
        if self.replace is not None:
            h = self.replace[step][rows].to(h).reshape(h.shape)
        for offset in (self.offset, None if self.step_offset is None else self.step_offset[step]):
            if offset is not None:
                offset = offset if len(offset) == 1 else offset[rows]
                h = h + offset.to(h).reshape(-1, *h.shape[1:])
        return h


@dataclass
class Trajectory:
    """End points of a batch of DDIM runs and, on request, h at every step (S, N, D), in
    the order the steps ran."""

    x: torch.Tensor
    h: torch.Tensor | None = None


class Sampler:
    """A deterministic sampler with a fixed number of steps on one denoiser, in fp32: the
    loop that DDIM and FlowEuler share (batches, h recording, Asyrp's edits). A subclass
    sets `schedule` (its `timesteps`, T -> 0), `levels` (the noise level before and after
    each step) and `step` (one move between two levels).

    `seconds` and `trajectories` accumulate over calls (the sampling share of an evaluation).
    """

    def __init__(self, unet: HUNet, steps: int, batch_size: int, clip: bool) -> None:
        self.unet = unet.float().eval()
        self.steps, self.batch_size, self.clip = steps, batch_size, clip
        self.seconds, self.trajectories = 0.0, 0

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def step(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        level: float,
        level_next: float,
        out_direction: torch.Tensor,
        clip: bool,
    ) -> torch.Tensor:
        """x at `level` -> x at `level_next` from the network's output (`out`, edited or not;
        `out_direction`, its own)."""
        raise NotImplementedError

    def sample(
        self, x_T: torch.Tensor, *, return_h: bool = False, edit: HEdit | None = None
    ) -> Trajectory:
        """x_T -> x_0, optionally editing h (Asyrp's asymmetric process)."""
        level, level_next = self.levels()
        return self._run(x_T, range(self.steps), level, level_next, return_h, edit, self.clip)

    def invert(self, x_0: torch.Tensor, *, return_h: bool = False) -> Trajectory:
        """x_0 -> x_T by running the same steps backwards, each with the network at the step's
        timestep (as diffusers' DDIMInverseScheduler, which never clips)."""
        level, level_next = self.levels()
        return self._run(
            x_0, range(self.steps - 1, -1, -1), level_next, level, return_h, None, False
        )

    @torch.no_grad()
    def _run(
        self,
        x_in: torch.Tensor,
        order: range,
        level_from: torch.Tensor,
        level_to: torch.Tensor,
        return_h: bool,
        edit: HEdit | None,
        clip: bool,
    ) -> Trajectory:
        start = time.perf_counter()
        outs, hs = [], []
        for lo in range(0, len(x_in), self.batch_size):
            rows = slice(lo, lo + self.batch_size)
            x = x_in[rows].to(self.device, torch.float32)
            h_steps = []
            for k in order:
                t = self.schedule.timesteps[k].item()  # DDIM's an int, the flow's a float
                h, skips, emb, ts = self.unet.encode(x, t)
                out = self.unet.decode(h, skips, emb, ts)
                out_x0 = out
                if edit is not None and t >= edit.t_edit:
                    out_x0 = self.unet.decode(edit.apply(h, k, rows), skips, emb, ts)
                x = self.step(x, out_x0, float(level_from[k]), float(level_to[k]), out, clip)
                if return_h:
                    h_steps.append(h.flatten(1).cpu())
            outs.append(x.cpu())
            if return_h:
                hs.append(torch.stack(h_steps))
        self.seconds += time.perf_counter() - start
        self.trajectories += len(x_in)
        return Trajectory(torch.cat(outs), torch.cat(hs, dim=1) if return_h else None)


class DDIM(Sampler):
    """Deterministic DDIM (eta = 0) of an epsilon-predicting U-Net."""

    def __init__(self, unet: HUNet, cfg: DiffusionConfig, steps: int, batch_size: int = 64) -> None:
        if steps < 1 or steps > cfg.num_train_timesteps:
            raise ValueError(f"DDIM steps={steps} must be in [1, {cfg.num_train_timesteps}]")
        super().__init__(unet, steps, batch_size, cfg.clip_sample)
        self.schedule = ddim_schedule(cfg, steps)

    def levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.schedule.alpha_bar, self.schedule.alpha_bar_prev

    def step(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        level: float,
        level_next: float,
        out_direction: torch.Tensor,
        clip: bool,
    ) -> torch.Tensor:
        return ddim_step(x, out, level, level_next, out_direction, clip)


class FlowEuler(Sampler):
    """The Euler ODE of a velocity-predicting (rectified-flow) denoiser, diffusers'
    FlowMatchEulerDiscreteScheduler's: deterministic, no clipping."""

    def __init__(self, unet: HUNet, cfg: DiffusionConfig, steps: int, batch_size: int = 64) -> None:
        if steps < 1:
            raise ValueError(f"flow steps={steps} must be >= 1")
        if cfg.clip_sample:  # (evaluate's clip_sample= may set it after the config's check)
            raise ConfigError(
                "diffusion.clip_sample=true: the flow sampler (Euler, as diffusers') "
                "does not clip: use clip_sample=false"
            )
        super().__init__(unet, steps, batch_size, False)
        self.schedule = flow_schedule(cfg, steps)

    def levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.schedule.sigma, self.schedule.sigma_next

    def step(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        level: float,
        level_next: float,
        out_direction: torch.Tensor,
        clip: bool,
    ) -> torch.Tensor:
        direction = None if out is out_direction else out_direction  # unedited: Euler's own
        return flow_step(x, out, level, level_next, direction)


# The protocol's name of each objective's sampler (metrics.json records it).
SAMPLERS = {Objective.ddpm: "DDIM eta=0 fp32", Objective.flow: "flow Euler ODE fp32"}


def build_sampler(unet: HUNet, cfg: DiffusionConfig, steps: int, batch_size: int = 64) -> Sampler:
    """The sampler of `diffusion.objective`: DDIM for ddpm, FlowEuler for flow."""
    kind = FlowEuler if cfg.objective == Objective.flow else DDIM
    return kind(unet, cfg, steps, batch_size)


def to_images(x: torch.Tensor) -> torch.Tensor:
    """Samples -> images in [-1, 1] (what an image file would hold, before quantisation)."""
    return x.clamp(-1, 1)


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 pixels round((x + 1) * 127.5) on the CPU, as an 8-bit
    image file holds them."""
    return ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
