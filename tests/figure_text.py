"""Whether a drawn matplotlib figure reads: its text does not collide, stays on the page and
no legend sits on the data (a helper of the figure tests)."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.axis import Tick
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.text import Text
from matplotlib.transforms import Bbox

SLACK = 1.0  # px: boxes that only touch do not collide


def _collide(a: Bbox, b: Bbox) -> bool:
    both = Bbox.intersection(a, b)
    return both is not None and both.width > SLACK and both.height > SLACK


def _labels(fig: Figure) -> list[Text]:
    """Titles, suptitles, axis labels, captions and free text: every visible, non-empty text
    but tick labels (each axis spaces its own) and legend entries (a legend is one box)."""
    inside = {id(t) for tick in fig.findobj(Tick) for t in (tick.label1, tick.label2)}
    for legend in fig.findobj(Legend):
        inside |= {id(t) for t in [*legend.get_texts(), legend.get_title()]}
    return [
        t
        for t in fig.findobj(Text)
        if id(t) not in inside and t.get_visible() and t.get_text().strip()
    ]


def text_problems(fig: Figure, dpi: float = 150) -> list[str]:
    """What does not read in `fig` drawn at `dpi` (the figures' PNGs'; text does not scale
    exactly with it): two labels (or a label and a legend) that overlap, text cut off by the
    page's edge, text on a panel not its own, a legend over a line's points."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(repr(t.get_text()), t.get_window_extent(renderer)) for t in _labels(fig)]
    legends = fig.findobj(Legend)
    boxes += [
        (f"legend {i}", legend.get_window_extent(renderer)) for i, legend in enumerate(legends)
    ]
    page = fig.bbox.padded(SLACK)
    problems = [
        f"{name} leaves the page"
        for name, box in boxes
        if not (page.contains(*box.p0) and page.contains(*box.p1))
    ]
    problems += [
        f"{a} overlaps {b}"
        for i, (a, box_a) in enumerate(boxes)
        for b, box_b in boxes[i + 1 :]
        if _collide(box_a, box_b)
    ]
    panels = [ax for ax in fig.findobj(Axes) if ax.get_visible()]
    problems += [
        f"{t.get_text()!r} lies on a panel"
        for t in _labels(fig)
        for ax in panels
        if ax is not t.axes and _collide(t.get_window_extent(renderer), ax.bbox)
    ]
    lines = [line for ax in fig.findobj(Axes) for line in ax.get_lines() if line.get_visible()]
    for i, legend in enumerate(legends):
        box = legend.get_window_extent(renderer)
        for line in lines:
            xy = line.get_transform().transform(np.column_stack(line.get_data()).astype(float))
            if any(box.contains(x, y) for x, y in xy[np.isfinite(xy).all(axis=1)]):
                problems.append(f"legend {i} hides points of {line.get_label()!r}")
    return problems
