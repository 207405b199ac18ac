"""The claims register (analysis.claims): the verdict rule, the bootstrap, pairing runs by
seed on a synthetic runs tree, the rendered page, and the spec's validation."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from isodiff.analysis.claims import (
    INCONCLUSIVE,
    NOT_MEASURED,
    NOT_REPRODUCED,
    REPRODUCED,
    bootstrap_interval,
    effect,
    main,
    verdict,
    write_claims,
)
from isodiff.analysis.synthetic import write_runs
from isodiff.errors import ConfigError
from isodiff.sweep.plan import Plan, read_plan, write_plan
from isodiff.sweep.specs import load_spec

REL_25 = {"relative": 0.25}


# ---- the verdict rule on closed-form cases -----------------------------------------------


def test_gains_clearly_above_the_smallest_reproduce() -> None:
    base = np.full(5, 10.0)
    e = effect(base, base - [3.0, 3.2, 2.8, 3.1, 2.9], "lower", REL_25)  # gains ~3 > 2.5
    assert e.smallest == pytest.approx(2.5) and e.mean == pytest.approx(3.0)
    assert e.low > 0 and e.verdict == REPRODUCED
    # the same gains in a higher-is-better metric
    assert effect(base, base + [3.0, 3.2, 2.8, 3.1, 2.9], "higher", REL_25).verdict == REPRODUCED


def test_gains_of_the_opposite_sign_do_not_reproduce() -> None:
    base = np.full(5, 10.0)
    e = effect(base, base + [1.0, 1.2, 0.8, 1.1, 0.9], "lower", REL_25)
    assert e.mean == pytest.approx(-1.0) and e.high < 0
    assert e.verdict == NOT_REPRODUCED


def test_a_tight_null_that_could_detect_the_claim_does_not_reproduce() -> None:
    base = np.full(6, 10.0)
    gains = np.array([0.1, -0.1, 0.05, -0.05, 0.0, 0.02])  # around 0, spread << 2.5
    e = effect(base, base - gains, "lower", REL_25)
    assert e.low < 0 < e.high < e.smallest
    assert e.detectable < e.smallest and e.verdict == NOT_REPRODUCED


def test_a_wide_spread_is_inconclusive() -> None:
    base = np.full(5, 10.0)
    gains = np.array([8.0, -6.0, 7.0, -5.0, 9.0])  # mean 2.6 >= 2.5, interval spans 0
    e = effect(base, base - gains, "lower", REL_25)
    assert e.low < 0 and e.high > e.smallest and e.verdict == INCONCLUSIVE


def test_two_pairs_are_inconclusive_whatever_the_numbers() -> None:
    e = effect(np.array([10.0, 10.0]), np.array([1.0, 1.1]), "lower", REL_25)
    assert e.pairs == 2 and e.low > e.smallest and e.verdict == INCONCLUSIVE
    assert verdict("lower", 9.0, 8.0, 10.0, 2.5, pairs=2) == INCONCLUSIVE


def test_a_cost_claim_is_judged_against_its_margin_both_ways() -> None:
    base = np.array([20.0, 21.0, 19.0, 20.5, 19.5])  # margin: a quarter of 20 = 5
    small = effect(base, base + [1.0, 1.5, 0.5, 1.2, 0.8], "at_most", REL_25)
    assert small.smallest == pytest.approx(5.0) and small.mean == pytest.approx(1.0)
    assert small.high < 5 and small.verdict == REPRODUCED
    large = effect(base, base + [9.0, 10.0, 11.0, 9.5, 10.5], "at_most", REL_25)
    assert large.low > 5 and large.verdict == NOT_REPRODUCED
    straddle = effect(base, base + [0.0, 10.0, 1.0, 9.0, 5.0], "at_most", REL_25)
    assert straddle.low < 5 < straddle.high and straddle.verdict == INCONCLUSIVE
    assert verdict("at_most", 1.0, 0.5, 4.9, 5.0, 5) == REPRODUCED
    assert verdict("at_most", 6.0, 5.1, 7.0, 5.0, 5) == NOT_REPRODUCED


def test_an_absolute_smallest_effect_is_in_the_metric_units() -> None:
    base = np.full(4, 30.0)
    e = effect(base, base + [0.6, 0.7, 0.65, 0.55], "higher", {"absolute": 0.5})
    assert e.smallest == 0.5 and e.verdict == REPRODUCED
    assert e.se == pytest.approx(statistics.stdev([0.6, 0.7, 0.65, 0.55]) / 2)
    assert e.detectable == pytest.approx(2.8 * e.se)
    assert e.seed_spread == 0.0  # the baseline's s.d. over seeds


# ---- the bootstrap -------------------------------------------------------------------------


def test_bootstrap_of_equal_gains_is_a_point() -> None:
    for c in (0.1, -3.7, 2.0):
        assert bootstrap_interval(np.full(5, c)) == (c, c)


def test_bootstrap_interval_brackets_the_mean_within_the_range_and_is_deterministic() -> None:
    gains = np.array([0.3, 1.2, -0.4, 0.8, 0.5, 2.1, 0.0])
    low, high = bootstrap_interval(gains)
    assert gains.min() <= low < gains.mean() < high <= gains.max()
    assert bootstrap_interval(gains) == (low, high)
    # roughly mean ± 1.96 x the bootstrap's s.e. (sd with ddof 0 over sqrt(k))
    half = 1.96 * gains.std() / math.sqrt(len(gains))
    assert (high - low) == pytest.approx(2 * half, rel=0.15)


# ---- runs -> pairs -> the register ---------------------------------------------------------

SEEDS = range(5)


def _values(dataset: str, lam: float, seed: int) -> dict[str, float]:
    """Known metric values per run: on shapes L_iso falls by 0.5 (+-0.02) in every seed, FID
    rises by 0.1, PPL falls by 5 +- 17 (inconclusive); on mnist L_iso rises by 0.3."""
    treated = lam > 0
    liso = 1.0 + 0.01 * seed
    fid = 10.0 + seed
    ppl = 100.0 + seed
    probe = 0.5 + 0.01 * seed
    if treated and dataset == "shapes":
        liso -= 0.5 + 0.02 * (seed - 2) / 2
        fid += 0.1
        ppl -= [25.0, -15.0, 20.0, -10.0, 5.0][seed]
        probe += 0.1
    elif treated:
        liso += 0.3
    return {
        "liso_scaled": liso,
        "fid": fid,
        "fid_floor": 2.0 + seed,
        "ppl_stylegan": ppl,
        "probe_lin_h": probe,
        "probe_lin_h_floor": 0.1,
        "probe_lin_h_floor_sd": 0.02,
    }


def _tree(root: Path, fail: frozenset[int] = frozenset()) -> dict[tuple[str, float, int], Path]:
    """table_1 at the quick tier with known values; table_6 planned on table_1's shapes runs
    (as the real sweep shares them); tables 2 and 3 planned with no runs."""
    spec = load_spec("table_1")
    runs = {}
    for run_dir in write_runs(root, spec, "quick", fail=set(fail)):
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        key = (cfg["data"]["name"], float(cfg["lambda_iso"]), int(cfg["seed"]))
        if (run_dir / "metrics.json").is_file():
            (run_dir / "metrics.json").write_text(
                json.dumps({"metrics": {"all": {"values": _values(*key)}}})
            )
        runs[key] = run_dir
    table_1 = read_plan(root / "quick", "table_1")
    write_plan(
        Plan("table_6", "quick", [j for j in table_1.jobs if j.dataset == "shapes"]), root / "quick"
    )
    for name in ("table_2", "table_3"):
        write_plan(Plan(name, "quick", []), root / "quick")
    return runs


def _rows(csv: Path) -> dict[tuple[str, str], dict[str, str]]:
    import pandas as pd

    frame = pd.read_csv(csv)
    return {(r["claim"], r["dataset"]): r for r in frame.to_dict("records")}


def test_claims_are_paired_by_seed_and_judged_on_the_planned_runs(tmp_path: Path) -> None:
    runs = _tree(tmp_path / "runs")
    md, csv = write_claims(tmp_path / "runs", "quick", tmp_path / "out")
    rows = _rows(csv)
    # L_iso on shapes: gains 0.5 + 0.01 (seed - 2), independent of the baseline's seed trend
    gains = [0.5 + 0.01 * (s - 2) for s in SEEDS]
    liso = rows["liso", "shapes"]
    assert liso["pairs"] == 5 and liso["verdict"] == REPRODUCED
    assert liso["mean"] == pytest.approx(statistics.mean(gains))
    assert liso["se"] == pytest.approx(statistics.stdev(gains) / math.sqrt(5))
    assert liso["baseline_mean"] == pytest.approx(1.02)
    assert liso["smallest"] == pytest.approx(0.25 * 1.02)
    assert liso["seed_spread"] == pytest.approx(statistics.stdev([1.0 + 0.01 * s for s in SEEDS]))
    assert liso["treatment"] == "lambda_iso=0.1" and liso["baseline"] == "lambda_iso=0"
    # on mnist the regulariser makes it worse: the gain is -0.3 in every pair
    assert rows["liso", "mnist"]["mean"] == pytest.approx(-0.3)
    assert rows["liso", "mnist"]["verdict"] == NOT_REPRODUCED
    # FID rises by 0.1, far below a quarter of ~12: the cost claim holds on shapes
    fid = rows["fid_cost", "shapes"]
    assert fid["mean"] == pytest.approx(0.1) and fid["verdict"] == REPRODUCED
    assert fid["floor"] == pytest.approx(statistics.mean(2.0 + s for s in SEEDS))
    assert rows["ppl", "shapes"]["verdict"] == INCONCLUSIVE
    # table_6's probe, on the shared shapes runs, with its permutation floor
    probe = rows["disentangled_probe", "shapes"]
    assert probe["source"] == "table_6" and probe["mean"] == pytest.approx(0.1)
    assert probe["verdict"] == REPRODUCED
    assert (probe["floor"], probe["floor_sd"]) == (pytest.approx(0.1), pytest.approx(0.02))
    # a metric no run stores, and sources without runs: not measured, with the reason
    assert rows["interpolation", "shapes"]["verdict"] == NOT_MEASURED
    assert "no planned run stores slerp_cv" in rows["interpolation", "shapes"]["reason"]
    assert rows["late_window", "–"]["verdict"] == NOT_MEASURED
    assert "table_3" in rows["late_window", "–"]["reason"]
    page = md.read_text()
    spec = load_spec("claims")
    assert spec.rule in page
    line = next(x for x in page.splitlines() if x.startswith("| `liso`") and "| shapes |" in x)
    assert "**reproduced**" in line and "| 5 |" in line
    # every pair of the verdict is cited by its run folders (relative to the run root)
    for seed in SEEDS:
        base = f"quick/shapes/{runs['shapes', 0.0, seed].name}"
        treated = f"quick/shapes/{runs['shapes', 0.1, seed].name}"
        assert f"seed {seed}: `{base}` vs `{treated}`" in page
    assert "bootstrap" in page.split("## Runs cited")[1]


def test_a_missing_treatment_run_leaves_the_claim_not_measured(tmp_path: Path) -> None:
    runs = _tree(tmp_path / "runs", fail=frozenset({5}))  # shapes, lambda 0.1, seed 0
    failed = [k for k, d in runs.items() if not (d / "metrics.json").is_file()]
    assert failed == [("shapes", 0.1, 0)]
    rows = _rows(write_claims(tmp_path / "runs", "quick", tmp_path / "out")[1])
    liso = rows["liso", "shapes"]
    assert liso["verdict"] == NOT_MEASURED and liso["pairs"] == 4
    assert "4 of 5 pairs measured" in liso["reason"]
    assert "synthetic failure" in liso["reason"]
    assert rows["liso", "mnist"]["verdict"] == NOT_REPRODUCED  # mnist is complete


def test_a_dataset_the_sweep_did_not_launch_says_which_command_runs_it(tmp_path: Path) -> None:
    # `make reproduce` sweeps table_1 with datasets=shapes: mnist's jobs are planned, not run
    runs = _tree(tmp_path / "runs")
    for (dataset, _, _), run_dir in runs.items():
        if dataset == "mnist":
            shutil.rmtree(run_dir)
    rows = _rows(write_claims(tmp_path / "runs", "quick", tmp_path / "out")[1])
    assert rows["liso", "shapes"]["verdict"] == REPRODUCED
    mnist = rows["liso", "mnist"]
    assert mnist["verdict"] == NOT_MEASURED and mnist["pairs"] == 0
    assert mnist["reason"] == (
        "table_1: not run (5 pairs planned): `python -m isodiff.sweep table_1 tier=quick`"
    )


def test_the_command_writes_the_register_and_refuses_a_tier_without_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([f"run_root={tmp_path}", f"out={tmp_path}/o"]) == 2
    assert "no runs under" in capsys.readouterr().err
    _tree(tmp_path / "runs")
    assert main([f"run_root={tmp_path / 'runs'}", f"out={tmp_path / 'out'}", "liso"]) == 0
    assert (tmp_path / "out" / "quick" / "claims.md").is_file()
    assert set(_rows(tmp_path / "out" / "quick" / "claims.csv")) == {
        ("liso", "shapes"),
        ("liso", "mnist"),
    }


# ---- the spec ------------------------------------------------------------------------------


def test_the_claims_spec_loads_and_every_claim_names_a_table() -> None:
    spec = load_spec("claims")
    assert spec.kind == "claims" and spec.rule.startswith("reproduced:")
    assert len({c.id for c in spec.claims}) == len(spec.claims) >= 10
    for claim in spec.claims:
        assert load_spec(claim.source or "table_1").kind == "table", claim.id


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"smallest": {"relative": 0.1, "absolute": 0.5}}, "claims[0].smallest"),
        ({"smallest": {"fraction": 0.1}}, "claims[0].smallest"),
        ({"direction": "sideways"}, "claims[0].direction"),
    ],
)
def test_a_malformed_claim_is_one_error_naming_its_key(
    tmp_path: Path, change: dict, key: str
) -> None:
    claim = {
        "id": "x",
        "text": "t",
        "metric": "fid",
        "direction": "lower",
        "smallest": {"relative": 0.1},
        **change,
    }
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump({"name": "bad", "title": "b", "kind": "claims", "claims": [claim]})
    )
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")) as err:
        load_spec(path)
    assert "'x'" in str(err.value) and "\n" not in str(err.value)
