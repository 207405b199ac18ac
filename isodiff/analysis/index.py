"""Write results/<tier>/index.md: the landing page of a tier's results, as GitHub renders it.

Examples:
  python -m isodiff.analysis.index                        # tier=quick
  python -m isodiff.analysis.index tier=smoke run_root=/tmp/runs out=/tmp/results

Keys: tier= (default quick), run_root= (default runs: the runs are
<run_root>/<tier>/...), out= (default results: pages go to <out>/<tier>/).

A link to the claims register (claims.md, analysis.claims) when there is one, every table
analysis.tables wrote (tables/*.md) inline, every figure (figures/*.png) under
its spec's title, and the sample grid of every evaluated run, copied to
samples/<dataset>/<job>.png so that the page and its images travel together.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from urllib.parse import quote

from isodiff import cli
from isodiff.analysis.collect import collect_runs
from isodiff.sweep.specs import all_specs


def _link(path: Path, page_dir: Path) -> str:
    """A file as a link relative to the page (job names hold '=' and ',', valid in URLs)."""
    return quote(path.relative_to(page_dir).as_posix(), safe="/=,")


def _demote(markdown: str) -> str:
    """Headings two levels down: a table's '# name: title' goes under the page's Tables."""
    return "\n".join(
        f"##{line}" if line.startswith("#") else line for line in markdown.strip().splitlines()
    )


def claims_link(page_dir: Path) -> list[str]:
    """A link to claims.md (analysis.claims: each of the paper's claims judged on its runs)
    when it was written."""
    if not (page_dir / "claims.md").is_file():
        return []
    link = _link(page_dir / "claims.md", page_dir)
    return [
        f"**The paper's claims, tested:** [claims.md]({link}) (each claim's paired effect "
        "over seeds, its interval and verdict).",
        "",
    ]


def tables_section(page_dir: Path) -> list[str]:
    """Each tables/<name>.md inline, with links to its LaTeX and CSV versions."""
    lines = ["## Tables", ""]
    tables = sorted((page_dir / "tables").glob("*.md"))
    if not tables:
        return [*lines, "No tables yet: run `python -m isodiff.analysis.tables`.", ""]
    for path in tables:
        others = [
            f"[{suffix[1:]}]({_link(path.with_suffix(suffix), page_dir)})"
            for suffix in (".tex", ".csv")
            if path.with_suffix(suffix).is_file()
        ]
        lines += [_demote(path.read_text()), ""]
        lines += [f"Also as {', '.join(others)}.", ""] if others else []
    return lines


def figures_section(page_dir: Path) -> list[str]:
    """Each figures/<name>.png, captioned by its spec's title (the file name otherwise)."""
    lines = ["## Figures", ""]
    figures = sorted((page_dir / "figures").glob("*.png"))
    if not figures:
        return [*lines, "No figures yet: run `python -m isodiff.analysis.figures`.", ""]
    titles = {spec.name: spec.title for spec in all_specs()}
    for path in figures:
        title = titles.get(path.stem, path.stem)
        lines += [
            f"### {path.stem}: {title}" if path.stem in titles else f"### {title}",
            "",
            f"![{title}]({_link(path, page_dir)})",
            "",
        ]
    return lines


def _copy_samples(run_dir: Path, copy: Path) -> bool:
    """<run>/samples.png copied to `copy`; False when the run has none."""
    if not (run_dir / "samples.png").is_file():
        return False
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "samples.png", copy)
    return True


def samples_section(run_root: Path, tier: str, page_dir: Path) -> list[str]:
    """A table per dataset: every evaluated run (one with metrics.json) and its samples."""
    lines = [
        "## Samples",
        "",
        "DDIM samples of each evaluated run's weights, from the same x_T in every run.",
        "",
    ]
    by_dataset: dict[str, list[Path]] = {}
    for _, row in collect_runs(run_root / tier).iterrows():
        if (Path(row["path"]) / "metrics.json").is_file():
            by_dataset.setdefault(str(row["cfg.data.name"]), []).append(Path(row["path"]))
    if not by_dataset:
        return [*lines, f"No evaluated runs under `{run_root / tier}`.", ""]
    for dataset, run_dirs in by_dataset.items():
        lines += [f"### {dataset}", "", "| run | samples |", "|---|---|"]
        for run_dir in run_dirs:
            copy = page_dir / "samples" / dataset / f"{run_dir.name}.png"
            shown = (
                f"![samples]({_link(copy, page_dir)})"
                if _copy_samples(run_dir, copy)
                else "no samples.png in the run folder"
            )
            lines.append(f"| `{run_dir.name}` | {shown} |")
        lines.append("")
    return lines


def write_index(run_root: Path, tier: str, out: Path) -> Path:
    """Write out/<tier>/index.md from what out/<tier>/ and run_root/<tier>/ hold now."""
    page_dir = out / tier
    page_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# isodiff results: the `{tier}` tier",
        "",
        "Written by `python -m isodiff.analysis.index` from the tables, figures and runs that "
        "had finished.",
        "",
        *claims_link(page_dir),
        *tables_section(page_dir),
        *figures_section(page_dir),
        *samples_section(run_root, tier, page_dir),
    ]
    path = page_dir / "index.md"
    path.write_text("\n".join(lines))
    return path


def lacking(args: cli.Args) -> list[str]:
    """What the page has nothing of yet, each with the command that makes it."""
    page_dir = args.out / args.tier
    options = [f"tier={args.tier}"]
    options += [] if args.run_root == Path("runs") else [f"run_root={args.run_root}"]
    options += [] if args.out == Path("results") else [f"out={args.out}"]
    parts = (
        ("claims register", "claims", (page_dir / "claims.md").is_file()),
        ("tables", "tables", any((page_dir / "tables").glob("*.md"))),
        ("figures", "figures", any((page_dir / "figures").glob("*.png"))),
    )
    return [
        f"no {what} yet: `python -m isodiff.analysis.{module} {' '.join(options)}`"
        for what, module, there in parts
        if not there
    ]


def main(argv: list[str]) -> int:
    def work(args: cli.Args) -> int:
        print(f"wrote {write_index(args.run_root, args.tier, args.out)}")
        for line in lacking(args):
            print(line)
        return 0

    return cli.analysis(__doc__, argv, work)


def command() -> None:
    """The `isodiff-index` console command."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    command()
