"""Benchmark: collect + render of 1,000 synthetic run folders (target: under 5 s).

python -m benchmarks.analysis [out=results/bench]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from isodiff.analysis.collect import collect_runs
from isodiff.analysis.synthetic import write_runs
from isodiff.analysis.tables import build_table, write_table
from isodiff.sweep.specs import load_spec

N_RUNS, TARGET_S = 1000, 5.0


def main(argv: list[str]) -> int:
    out = Path(dict(a.split("=", 1) for a in argv if "=" in a).get("out", "results/bench"))
    # table_1 with 250 seeds: 2 datasets x 2 lambdas x 250 = 1,000 runs, all in the table.
    base = load_spec("table_1")
    spec = replace(base, grid={**base.grid, "seed": list(range(N_RUNS // 4))}, tiers={})
    with tempfile.TemporaryDirectory() as tmp:
        write_runs(Path(tmp) / "runs", spec, "quick")
        t0 = time.perf_counter()
        table = build_table(collect_runs(Path(tmp) / "runs" / "quick"), spec, "quick")
        write_table(table, "quick", Path(tmp) / "tables")
        seconds = time.perf_counter() - t0
    assert int(table.numbers["fid_n"].sum()) == N_RUNS, "every synthetic run must be counted"
    result = {
        "runs": N_RUNS,
        "collect_and_render_s": round(seconds, 3),
        "target_s": TARGET_S,
        "meets_target": seconds < TARGET_S,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"collect + render of {N_RUNS} runs: {seconds:.2f} s (target < {TARGET_S} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
