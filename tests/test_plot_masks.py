"""scripts/plot_masks.py: which regions the before / after figure shows, and that it draws them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from plot_masks import load_ious, main, pick_regions  # noqa: E402


def test_pick_regions_takes_the_largest_gains_on_multi_shape_images_only():
    before = {0: {"iou": 0.1, "num_regions": 1}, 1: {"iou": 0.2, "num_regions": 2}, 2: {"iou": 0.5, "num_regions": 3},
              3: {"iou": 0.9, "num_regions": 2}, 4: {"iou": None, "num_regions": 2}}
    after = {0: {"iou": 0.99}, 1: {"iou": 0.4}, 2: {"iou": 0.95}, 3: {"iou": 0.5}, 4: {"iou": 0.9}}
    assert pick_regions(before, after, n=2) == [2, 1]  # row 0 gains most but has one shape; row 4 was unscored
    assert pick_regions(before, after, n=5) == [2, 1, 3]
    assert pick_regions(before, after, n=5, min_regions=1) == [0, 2, 1, 3]


def test_main_draws_the_picked_regions_with_both_models(tmp_path):
    pytest.importorskip("matplotlib")
    from sa2va_trl.data.synthetic import main as make_data

    data = tmp_path / "shapes"
    make_data(["--out", str(data), "--n", "1", "--n-validation", "1", "--n-test", "6"])
    from sa2va_trl.data.loaders import load_rows

    rows = load_rows(str(data), split="test")
    counts = {}
    for sid in rows["source_id"]:
        counts[sid] = counts.get(sid, 0) + 1
    lines = [{"row": i, "num_regions": counts[sid], "iou": 0.5} for i, sid in enumerate(rows["source_id"])]
    multi = [line["row"] for line in lines if line["num_regions"] > 1]
    assert multi, "the seeded split has a multi-shape image"
    for name, bump in (("before", 0.0), ("after", 0.1)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for line in lines:
                f.write(json.dumps({**line, "iou": line["iou"] + (bump if line["row"] == multi[0] else 0.0)}) + "\n")
    assert load_ious(str(tmp_path / "after.jsonl"))[multi[0]]["iou"] == pytest.approx(0.6)
    out = tmp_path / "fig.png"
    picked = main(["--data", str(data), "--before", "builtin:tiny-warm", "--after", "builtin:tiny-warm",
                   "--before-predictions", str(tmp_path / "before.jsonl"),
                   "--after-predictions", str(tmp_path / "after.jsonl"), "--n", "2", "--out", str(out)])
    assert picked[0] == multi[0] and len(picked) == 2
    assert out.stat().st_size > 10_000
