"""``ngexp report``'s figures and console table as people read them: the legend outside the
axes, labels made of what differs among the lines (the rest once, in the title), runs with
nothing to draw named in the legend, and the table at full width when written to a file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from test_report import make_run

from ngexp.report import main, plots


@pytest.fixture
def figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The figures ``ngexp report`` draws, by file name, drawn (laid out) but kept open."""
    drawn: dict[str, Any] = {}
    save = plots._save

    def keep(fig: Any, path: Path) -> Path:
        fig.savefig(path, dpi=60)
        fig.canvas.draw()  # at the figure's own dpi, the constrained layout settled
        drawn[path.name] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield drawn
    for fig in drawn.values():
        save(fig, Path(str(tmp_path / "closed.png")))


def test_legend_outside_labels_what_varies_and_notes_runs_not_drawn(
        tmp_path: Path, figures: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    for seed in (0, 1):
        make_run(root, "sgd", seed, [0.5 + 0.1 * seed, 0.8])
        make_run(root, "adam", seed, [0.6, 0.85 + 0.01 * seed])
    make_run(root, "adam", 2, [0.3, math.nan], status="failed", reason="nan at step 150")
    make_run(root, "kfac", 0, [math.nan], status="failed", reason="nan at step 3")
    assert main([str(root), "--by", "optimizer,trainer.epochs"]) == 0
    fig = figures["test-acc_vs_epoch.png"]
    (ax,) = fig.axes
    (legend,) = fig.legends
    assert ax.get_legend() is None
    labels = [text.get_text() for text in legend.get_texts()]
    assert sorted(labels) == ["adam (n=2)", "adam, seed 2: failed(nan at step 150)",
                              "kfac, seed 0: failed(nan at step 3), no test/acc to draw",
                              "sgd (n=2)"]
    assert "trainer.epochs=2" in ax.get_title()  # the same for every line: said once
    renderer = fig.canvas.get_renderer()
    box, axes_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.x0 >= axes_box.x1 - 1 or box.y1 <= axes_box.y0 + 1  # right of / below the axes
    assert box.x1 <= fig.bbox.x1 + 1 and box.x0 >= -1 and box.y0 >= -1  # inside the figure


def test_the_console_table_is_whole_when_written_to_a_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    for optimizer in ("sgd", "adam", "kfac"):
        make_run(root, optimizer, 0, [0.5, 0.8], lr=0.0123456789)
    assert main([str(root), "--by", "optimizer,optimizer.lr,optimizer.momentum",
                 "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    header = next(line for line in out.splitlines() if "optimizer.momentum" in line)
    assert "optimizer.lr" in header and "status" in header
    assert sum("completed" in line for line in out.splitlines() if line.startswith("│")) == 3
