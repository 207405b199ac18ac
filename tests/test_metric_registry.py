"""The metric registry: each metric module declares itself (isodiff.evaluate.metrics.Metric),
and the evaluation's config, value names and directions follow; metric modules import light."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from isodiff.evaluate import config
from isodiff.evaluate.metrics import lower_is_better, registry

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "diffusers", "accelerate", "lpips", "cleanfid", "sklearn", "scipy")


def run_python(code: str) -> str:
    """stdout of `code` in a fresh interpreter (what a command sees at start-up)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_registry_holds_every_metric_in_order() -> None:
    assert list(registry()) == [
        "fid",
        "ppl",
        "rtl",
        "interp",
        "jacobian",
        "separability",
        "inversion",
        "quality",
        "liso",
        "linearity",
        "disentanglement",
    ]
    fields = [f.name for f in dataclasses.fields(config.EvalConfig)]
    assert fields == ["name", *registry(), "grid_samples", "grid_steps", "cpu_threads"]
    for name, metric in registry().items():
        assert metric.module == f"isodiff.evaluate.metrics.{name}"
        assert all(config.metric_of(v) == name for v in metric.values)
    # versions as the modules set them (stored protocols carry them)
    assert {n: m.version for n, m in registry().items() if m.version > 1} == {
        "ppl": 2,
        "interp": 3,
        "liso": 2,
    }


def test_directions_come_from_the_declarations() -> None:
    for value in (
        "fid",
        "ppl_stylegan",
        "ppl_stylegan_per_diversity",
        "mrtl",
        "mcn_t999",
        "ls_h",
        "mse",
        "lpips",
        "liso",
        "lin_h_mean_r2",
        "angle_h",
    ):
        assert lower_is_better(value), value
    for value in (
        "psnr",
        "confident_shape",
        "classes_shape",
        "dci_h_informativeness",
        "mig_h",
        "probe_lin_h",
        "ppl_stylegan_diversity",
    ):
        assert not lower_is_better(value), value


def test_light_constants_match_the_heavy_modules() -> None:
    from isodiff.evaluate.metrics import common, interp, linearity
    from isodiff.model import directions

    assert tuple(common.PATHS) == interp.PATH_NAMES
    assert linearity.SPACES == directions.SPACES


def test_metric_modules_and_the_config_load_nothing_heavy() -> None:
    out = run_python(f"""
        import sys
        import isodiff.evaluate, isodiff.evaluate.config, isodiff.evaluate.metrics
        for metric in isodiff.evaluate.metrics.registry().values():
            __import__(metric.module)
        print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))
    """)
    assert out.strip() == "[]"


TOY = '''
"""A metric planted by a test."""
from __future__ import annotations

from dataclasses import dataclass

from isodiff.evaluate.metrics import Metric
from isodiff.evaluate.metrics.result import MetricResult, protocol_of


@dataclass
class ToyConfig:
    enabled: bool = False
    knob: int = 1


def evaluate(ctx: object, cfg: ToyConfig) -> MetricResult:
    return MetricResult({"toy_gain": 1.0, "toy_loss": 0.0}, protocol_of(cfg))


METRIC = Metric(name="toy", config=ToyConfig, values=("toy_",), higher_is_better=("toy_gain",))
'''


def test_a_new_metric_is_its_module_alone(tmp_path: Path) -> None:
    """A module added to the package (here through its path) is a metric everywhere: the
    registry, the eval config (unknown keys still refused), the value names and their
    direction, and evaluate; nothing else is edited."""
    (tmp_path / "toy.py").write_text(TOY)
    out = run_python(f"""
        import dataclasses, sys
        import isodiff.evaluate.metrics
        isodiff.evaluate.metrics.__path__.append({str(tmp_path)!r})
        from omegaconf import OmegaConf
        from isodiff.evaluate import config as ec
        from isodiff.evaluate.metrics import lower_is_better, registry

        assert list(registry())[-1] == "toy", list(registry())
        assert "toy" in [f.name for f in dataclasses.fields(ec.EvalConfig)]
        assert ec.metric_of("toy") == ec.metric_of("toy_gain") == "toy"
        assert ec.VALUE_PREFIXES["toy_"] == "toy"
        assert not lower_is_better("toy_gain") and lower_is_better("toy_loss")
        cfg = ec.to_evaluate_config(OmegaConf.create(
            {{"run": "/x", "metrics": ["toy"], "eval": {{"toy": {{"knob": 3}}}}}}))
        assert cfg.eval.toy.knob == 3 and cfg.metrics == ["toy"]
        try:
            ec.to_evaluate_config(OmegaConf.create(
                {{"run": "/x", "eval": {{"toy": {{"bogus": 1}}}}}}))
        except Exception as err:
            assert "bogus" in str(err), err
        else:
            raise AssertionError("an unknown key under eval.toy was accepted")
        print(registry()["toy"].evaluate(None, cfg.eval.toy).values)
    """)
    assert out.strip() == "{'toy_gain': 1.0, 'toy_loss': 0.0}"


def test_the_attribute_net_keeps_its_parameter_names() -> None:
    """Classifiers cached under refs/ by the module class it replaced still load."""
    from isodiff.evaluate.metrics.attributes import attribute_net

    keys = list(attribute_net(3, 5, 8).state_dict())
    assert keys[:2] == ["features.0.weight", "features.0.bias"]
    assert keys[-2:] == ["head.weight", "head.bias"] and len(keys) == 14
