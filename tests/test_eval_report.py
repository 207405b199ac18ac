"""What an evaluation says (isodiff.evaluate.report): the summary table at its end and the
run's report.md name every metric with its values, floors, direction and time, and say
which metrics were skipped or failed; metrics.json records each metric's seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from isodiff.evaluate import report
from tests.conftest import run_cli, run_train_job


def _entry(values: dict[str, float], seconds: float, arrays: str | None = None) -> dict:
    return {
        "values": values,
        "protocol": {"seed": 0, "n": 8, "steps": 2, "weights_sha256": "ab" * 32},
        "provenance": {"seconds": seconds},
        "arrays": arrays,
    }


RECORD = {
    "run": "/runs/smoke/default/job",
    "metrics": {
        "fid": _entry({"fid": 412.5, "fid_heldout": 398.25, "fid_floor": 61.75}, 3.25),
        "separability": _entry(
            {"ls_h": 2.5, "ls_h_se": 0.25, "ls_h_floor": 2.75, "ls_h_floor_sd": 0.25},
            7.5,
            "eval/separability.npz",
        ),
        "disentanglement": _entry(
            {
                "probe_lin_h": 0.875,
                "probe_lin_h_floor": 0.125,
                "probe_lin_h_floor_sd": 0.0625,
                "probe_lin_h_ceiling": 0.96875,
                "probe_lin_h_ceiling_rot": 0.9375,
            },
            11.0,
        ),
    },
    "failed": {"rtl": {"error": "RuntimeError: out of patience\nmore", "cause": "run"}},
}
STATES = {
    "fid": report.COMPUTED,
    "separability": report.SKIPPED,
    "disentanglement": report.COMPUTED,
    "rtl": report.FAILED,
}


def _line(text: str, metric: str) -> str:
    """The summary line that starts with a metric's name."""
    (line,) = [row for row in text.splitlines() if row.startswith(f"{metric} ")]
    return line


def test_the_summary_shows_values_floors_directions_and_times() -> None:
    text = report.summary(RECORD, STATES, Path("/runs/smoke/default/job"))
    fid = _line(text, "fid")
    assert "computed" in fid and "fid 412.5" in fid and "floor 61.75 (real vs real)" in fid
    assert fid.split()[-2:] == ["lower", "3.2"]  # 3.25 s to one decimal
    assert "fid_heldout 398.2" in text  # its second headline value, a line of its own
    ls = _line(text, "separability")
    assert "up to date, skipped" in ls and "ls_h 2.5 ± 0.25 se" in ls
    assert "floor 2.75 ± 0.25 (at floor)" in ls  # |2.5 - 2.75| <= 2 s.d. and ls.endswith("(7.5)")
    probe = _line(text, "disentanglement")
    assert "probe_lin_h 0.875" in probe and "floor 0.125 ± 0.0625;" in probe
    assert "ceiling 0.9688 / rotated 0.9375" in probe and "higher" in probe
    assert "(at floor)" not in probe  # 0.875 is 12 s.d. above its floor
    rtl = _line(text, "rtl")
    assert "FAILED" in rtl and "RuntimeError: out of patience" in rtl and "more" not in rtl
    assert "4 metrics: 2 computed in 14.2 s, 1 up to date" in text and "1 failed" in text
    assert "quality check: fails: " in text  # FID 398 > 3 x 61.75; no classifier figures
    assert "{" not in text  # no raw dicts


def test_the_page_holds_the_config_samples_and_every_stored_metric(tmp_path: Path) -> None:
    (tmp_path / "samples.png").write_bytes(b"png")
    config = {"experiment": "default", "lambda_iso": 0.5, "iso": {"window": 0.5}, "seed": 3}
    page = report.page(tmp_path, RECORD, {"fid": report.COMPUTED}, config)
    assert page.startswith(f"# Run {tmp_path.name}")
    assert "| lambda_iso | 0.5 |" in page and "| iso.window | 0.5 |" in page
    assert "| init_from | – |" in page and "| seed | 3 |" in page
    assert "![samples](samples.png)" in page
    assert "[eval/separability.npz](eval/separability.npz)" in page
    rows = [r for r in page.splitlines() if r.startswith("| ") and " | " in r]
    for name, state in (
        ("fid", "computed"),
        ("separability", "up to date, skipped"),  # stored, not asked for this time
        ("disentanglement", "up to date, skipped"),
        ("rtl", "FAILED"),
    ):
        assert any(r.startswith(f"| {name} | {state} |") for r in rows), name
    assert "n=8, steps=2" in page and "weights_sha256=abababababab" in page
    (tmp_path / "samples.png").unlink()
    assert "![samples]" not in report.page(tmp_path, RECORD, {}, config)


@pytest.mark.slow
def test_an_evaluation_ends_with_its_summary_and_writes_its_page(run_root: Path) -> None:
    """The command's own output against metrics.json read independently: every metric with
    its value and floor and time; report.md; an up-to-date rerun says skipped."""
    status, run_dir = run_train_job([], run_root)
    assert status["state"] == "done"
    args = (f"run={run_dir}", "eval=smoke", "metrics=[fid,separability,rtl]", "progress=false")
    first = run_cli("isodiff.evaluate", *args)
    assert first.returncode == 0, first.stderr
    stored = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert set(stored) == {"fid", "separability", "rtl"}
    for name, entry in stored.items():
        seconds = entry["provenance"]["seconds"]
        assert isinstance(seconds, float) and seconds > 0, name
        line = _line(first.stdout, name)
        assert "computed" in line and line.endswith(f"{seconds:.1f}"), line
    fid, ls = stored["fid"]["values"], stored["separability"]["values"]
    assert f"fid {fid['fid']:.4g}" in _line(first.stdout, "fid")
    assert f"floor {fid['fid_floor']:.4g}" in _line(first.stdout, "fid")
    assert f"ls_h {ls['ls_h']:.4g} ± {ls['ls_h_se']:.4g} se" in first.stdout
    assert f"floor {ls['ls_h_floor']:.4g} ± {ls['ls_h_floor_sd']:.4g}" in first.stdout
    assert f"mrtl {stored['rtl']['values']['mrtl']:.4g}" in _line(first.stdout, "rtl")
    assert "{'" not in first.stdout  # no raw dicts on the terminal

    page = (run_dir / "report.md").read_text()
    written = (run_dir / "report.md").stat().st_mtime_ns
    assert "![samples](samples.png)" in page and (run_dir / "samples.png").is_file()
    assert "| tier.name | smoke |" in page
    for name in stored:
        assert f"| {name} | computed |" in page

    again = run_cli("isodiff.evaluate", *args)
    assert again.returncode == 0, again.stderr
    for name in stored:
        assert "up to date, skipped" in _line(again.stdout, name)
    assert "0 computed" in again.stdout and "3 up to date" in again.stdout
    # nothing measured: the page is left as it was (it describes the metrics, not the call)
    assert (run_dir / "report.md").read_text() == page
    assert (run_dir / "report.md").stat().st_mtime_ns == written
