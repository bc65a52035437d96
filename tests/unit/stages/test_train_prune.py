"""The pruning summary rule (the best depth), without data on disk."""

from __future__ import annotations

from pipeline.stages.prune import best_depth


def test_best_depth_is_the_shallowest_within_tolerance_of_the_deepest():
    rows = [
        {"depth": 1, "miou": 0.80},
        {"depth": 2, "miou": 0.865},
        {"depth": 3, "miou": 0.88},
        {"depth": 4, "miou": 0.87},
    ]
    assert best_depth(rows, "miou", 0.01) == 2
    assert best_depth(rows, "miou", 0.0) == 3  # L3 beats L4
    assert best_depth(rows, "miou", 0.1) == 1
