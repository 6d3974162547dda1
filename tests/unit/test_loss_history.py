"""training.loop.loss_history: the loss curve of a whole run from progress.txt, across resumes
(issue: after a resume the PNG showed only the resumed steps)."""

from __future__ import annotations

import json

from megatron_navil.training.loop import loss_history, plot_loss


def test_a_resumed_run_keeps_the_earlier_steps_and_the_redone_ones_win(tmp_path):
    progress = tmp_path / "progress.txt"
    first = [{"step": s, "loss": 10.0 - s} for s in range(1, 6)]  # ran to 5, saved at 2
    resumed = [{"step": s, "loss": 20.0 - s} for s in range(3, 8)]  # resumed from 2
    lines = [json.dumps(e) for e in first + resumed] + ["not json", '{"step": 9}']
    progress.write_text("\n".join(lines) + "\n")
    history = loss_history(progress)
    assert history == [(1, 9.0), (2, 8.0), (3, 17.0), (4, 16.0), (5, 15.0), (6, 14.0), (7, 13.0)]
    plot_loss(history, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert loss_history(tmp_path / "missing.txt") == []
