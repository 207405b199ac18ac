"""The suite's transformer and LoRA options (issue 29 item 4): model=dit_tiny (an
unconditional DiT, h at its middle block by the library's h_encoder) trains, saves, loads and
evaluates at the smoke tier; train.lora.rank fine-tunes a base's adapter alone, resumes
exactly and saves the adapter merged into the base weights."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from isodiff.config import to_train_config
from isodiff.runs.status import read_status
from tests.conftest import compose_train, refusal, run_cli, run_train_job

DIT = ["model=dit_tiny", "lambda_iso=0.1", "iso.window=0", "train.grid_samples=4"]
TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def _weights(run_dir: Path, which: str = "unet") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / which / "diffusion_pytorch_model.safetensors")


def _dit(seed: int = 0) -> torch.nn.Module:
    from isodiff.model.unet import build_unet

    torch.manual_seed(seed)
    return build_unet(to_train_config(compose_train(["tier=smoke", "model=dit_tiny"])).model)


def test_dit_h_is_the_library_h_and_the_split_is_the_forward() -> None:
    """encode's h is h_encoder's at the middle block, bitwise; decode(encode) is the
    model's own forward; the one class label never drops (train mode is deterministic)."""
    from isodiff.adapters import h_encoder
    from isodiff.model.dit import HDiT

    model = _dit()
    assert isinstance(model, HDiT) and model.h_index == 1  # 4 blocks: the second
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    h, skips, labels, ts = model.encode(x, t)
    assert h.shape == (3, 32, 8, 8)  # (width, rows, cols) of the 8 x 8 patch grid
    assert torch.equal(h, model.encode_h(x, t))
    tokens = h_encoder(model, 1)(x, t, class_labels=labels)
    assert torch.equal(h.flatten(2).transpose(1, 2), tokens)
    with torch.no_grad():
        assert torch.equal(model.decode(h, skips, labels, ts), model(x, t).sample)
    model.train()
    with torch.no_grad():
        assert torch.equal(model.eps_and_h(x, t)[0], model.eps_and_h(x, t)[0])


def test_a_dit_job_trains_saves_loads_and_evaluates(run_root: Path) -> None:
    import pandas as pd

    from isodiff.config import compose
    from isodiff.evaluate.config import register_schemas, to_evaluate_config
    from isodiff.evaluate.measure import evaluate_run
    from isodiff.model.dit import HDiT
    from isodiff.model.unet import load_unet

    status, run_dir = run_train_job(DIT, run_root)
    assert status["state"] == "done" and status["step"] == 6
    assert pd.read_csv(run_dir / "metrics.csv")["iso"].notna().all()  # L_iso at every step
    for which in ("unet", "unet_ema"):
        loaded = load_unet(str(run_dir), ema=which == "unet_ema")
        assert isinstance(loaded, HDiT)
        saved = _weights(run_dir, which)
        assert loaded.state_dict().keys() == saved.keys()
        assert all(torch.equal(loaded.state_dict()[k], saved[k]) for k in saved)
    register_schemas()
    cfg = to_evaluate_config(
        compose(
            "evaluate",
            [f"run='{run_dir}'", "eval=smoke", "progress=false", "metrics=[liso,rtl,jacobian]"],
        )
    )
    record = evaluate_run(cfg)
    for name in ("liso", "rtl", "jacobian"):
        values = record["metrics"][name]["values"]
        assert values and all(math.isfinite(v) for v in values.values()), (name, values)

    # LoRA on the DiT: its attention projections alone move; final/ loads as an HDiT
    status, tuned = run_train_job(
        [*DIT, f"init_from='{run_dir}'", "train.lora.rank=2", "train.steps=2"], run_root
    )
    assert status["state"] == "done" and isinstance(load_unet(str(tuned)), HDiT)
    before, after = _weights(run_dir, "unet_ema"), _weights(tuned)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(any(f".attn1.{t}.weight" in k for t in TARGETS) for k in moved)


def test_a_bad_dit_config_is_one_line_exit_2_and_no_folder(tmp_path: Path) -> None:
    run_root = tmp_path / "runs"
    result = run_cli(
        "isodiff.train",
        "tier=smoke",
        "model=dit_tiny",
        "model.dit.patch_size=3",
        f"run_root={run_root}",
        HYDRA_FULL_ERROR="",
    )
    line = refusal(result)
    assert line.startswith("error: "), line
    assert "model.dit.patch_size=3" in line and "(16)" in line, line
    assert not run_root.exists()


def test_lora_identity_names_the_rank_and_rank_0_is_the_plain_job(tmp_path: Path) -> None:
    base = ["tier=smoke", "init_from=/some/base-0123abcd"]
    names = {
        rank: compose_train([*base, f"train.lora.rank={rank}"], tmp_path).name for rank in (0, 4, 8)
    }
    assert "train.lora.rank=4" in names[4]
    signatures = {rank: name.rsplit("-", 1)[1] for rank, name in names.items()}
    assert len(set(signatures.values())) == 3
    assert signatures[0] == compose_train(base, tmp_path).name.rsplit("-", 1)[1]


def _base(root: Path) -> Path:
    status, base = run_train_job(["train.grid_samples=0"], root / "base")
    assert status["state"] == "done"
    return base


LORA = [
    "train.lora.rank=4",
    "lambda_iso=0.1",
    "iso.window=0",
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.grid_samples=0",
]


def test_a_lora_finetune_trains_the_adapter_alone_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from accelerate import Accelerator

    from isodiff.lora import lora_parameters
    from isodiff.train import loop

    base = _base(tmp_path)
    args = [f"init_from='{base}'", *LORA]
    cfg = to_train_config(compose_train(["tier=smoke", *args], tmp_path / "x"))
    state = loop.build_state(cfg, Accelerator(cpu=True))
    optimised = state.optimizer.param_groups[0]["params"]
    assert {id(p) for p in optimised} == {id(p) for p in lora_parameters(state.unet).values()}

    status, run_dir = run_train_job(args, tmp_path / "a")
    assert status["state"] == "done" and "train.lora.rank=4" in run_dir.name
    merged, before = _weights(run_dir), _weights(base, "unet_ema")  # the base it loaded
    assert merged.keys() == before.keys()  # a plain U-Net: the adapter is merged in
    targeted = {k for k in merged if any(f".{t}.weight" in k for t in TARGETS)}
    assert targeted
    for key in merged.keys() - targeted:
        assert torch.equal(merged[key], before[key]), key
    for key in targeted:  # the LoRA delta scale * B A: rank 4 (up to fp32 rounding)
        s = torch.linalg.svdvals((merged[key] - before[key]).double())
        assert s[0] > 0 and s[4:].max() < 1e-2 * s[0], (key, s)

    # killed after its step-2 checkpoint (a failure there), then run again: it resumes
    real = loop.write_grid

    def crash(state: object, cfg: object, run_dir: Path, step: int) -> None:
        if step == 2:
            raise RuntimeError("killed")
        real(state, cfg, run_dir, step)

    monkeypatch.setattr(loop, "write_grid", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_train_job(args, tmp_path / "b")
    (resumed,) = (tmp_path / "b").glob("*/*/*")
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step_00000002"]
    monkeypatch.setattr(loop, "write_grid", real)
    caplog.set_level(logging.INFO, logger="isodiff.train.loop")
    status, _ = run_train_job(args, tmp_path / "b")
    assert "resuming" in caplog.text and "from step 2" in caplog.text
    assert status["state"] == "done" and read_status(resumed)["attempts"] == 2
    for which in ("unet", "unet_ema"):
        a, b = _weights(run_dir, which), _weights(resumed, which)
        assert all(torch.equal(a[k], b[k]) for k in a), which


def test_lora_without_a_base_is_refused() -> None:
    from isodiff.errors import ConfigError

    with pytest.raises(ConfigError, match="train.lora.rank=4 is invalid"):
        to_train_config(compose_train(["tier=smoke", "train.lora.rank=4"]))


def test_a_sweep_plans_dit_bases_and_finetunes(tmp_path: Path) -> None:
    """`model=dit_tiny` on a sweep's command line reaches its bases and fine-tunes, as any
    training override (the full sweep at smoke, evaluation included, is run by hand)."""
    from isodiff.sweep import plan

    result = run_cli(
        "isodiff.sweep", "table_1", "tier=smoke", "model=dit_tiny", f"run_root={tmp_path}", "--plan"
    )
    assert result.returncode == 0, result.stderr
    assert "3 jobs" in result.stdout and "base" in result.stdout
    base = to_train_config(
        plan.compose_job(
            plan.base_overrides("shapes", "smoke", ["model=dit_tiny", f"run_root={tmp_path}"])
        )
    )
    assert base.model.arch.value == "dit"


def test_a_checkpoint_loads_as_its_own_architecture(tmp_path: Path) -> None:
    """load_unet reads the class from config.json; a base of the other arch is refused."""
    from isodiff.errors import ConfigError
    from isodiff.model.dit import HDiT
    from isodiff.model.unet import init_unet
    from tests.conftest import tiny_model

    model = _dit()
    model.save_pretrained(tmp_path / "dit")
    cfg = to_train_config(compose_train(["tier=smoke", "model=dit_tiny"])).model
    loaded = init_unet(cfg, str(tmp_path / "dit"))
    assert isinstance(loaded, HDiT)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    with pytest.raises(ConfigError, match="holds a HDiT, not the model.arch=unet"):
        init_unet(tiny_model(), str(tmp_path / "dit"))


def test_model_h_block_moves_h_to_that_block_and_survives_save_and_load(tmp_path: Path) -> None:
    """model.h_block=-1 makes h the last block's output: what a forward hook on that block
    sees, not the middle block's; encode/decode still compose to the forward, and a saved
    model (and one rebuilt from its config, as LoRA's merge is) reads h at the same block."""
    from isodiff.model.dit import HDiT
    from isodiff.model.unet import build_unet, init_unet

    cfg = to_train_config(compose_train(["tier=smoke", "model=dit_tiny", "model.h_block=-1"]))
    torch.manual_seed(0)
    model = build_unet(cfg.model).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    seen = {}
    hooks = [
        model.transformer_blocks[i].register_forward_hook(
            lambda m, i_, out, i=i: seen.__setitem__(i, out.detach())
        )
        for i in (1, 3)
    ]
    with torch.no_grad():
        eps = model(x, t).sample
        h, skips, labels, ts = model.encode(x, t)
    for hook in hooks:
        hook.remove()
    tokens = h.flatten(2).transpose(1, 2)
    assert model.h_index == 3 and torch.equal(tokens, seen[3])
    assert not torch.allclose(tokens, seen[1])  # the middle block's: the default's h
    assert torch.equal(model.encode_h(x, t), h)
    with torch.no_grad():
        assert torch.allclose(model.decode(h, skips, labels, ts), eps, atol=1e-6)
    model.save_pretrained(tmp_path / "dit")
    assert HDiT.from_pretrained(tmp_path / "dit").h_index == 3
    assert HDiT.from_config(model.config).h_index == 3
    default = to_train_config(compose_train(["tier=smoke", "model=dit_tiny"])).model
    assert init_unet(default, str(tmp_path / "dit")).h_index == 1  # the job's config decides


def test_model_h_block_is_checked_and_in_the_identity_only_when_set(tmp_path: Path) -> None:
    from isodiff.errors import ConfigError

    for bad, fix in (
        (["model=dit_tiny", "model.h_block=4"], "-4..3"),
        (["model.h_block=0"], "a U-Net's h is its mid block"),
    ):
        with pytest.raises(ConfigError, match=f"model.h_block=.*{fix}"):
            to_train_config(compose_train(["tier=smoke", *bad]))
    names = {
        block: compose_train(["tier=smoke", "model=dit_tiny", *block], tmp_path).name
        for block in ((), ("model.h_block=null",), ("model.h_block=2",))
    }
    signature = {k: name.rsplit("-", 1)[1] for k, name in names.items()}
    # ad60790b: this job's signature before model.h_block existed
    assert signature[()] == signature[("model.h_block=null",)] == "ad60790b"
    assert signature[("model.h_block=2",)] != "ad60790b"
