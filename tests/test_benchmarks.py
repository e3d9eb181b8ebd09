"""The benchmark scripts run with their smallest settings and write JSON with the expected keys; the Timer is exact.

    pytest tests/test_benchmarks.py -m "not slow"   # the Timer tests only (scripts/test.sh's default)
    pytest tests/test_benchmarks.py                 # also the three scripts at their smallest (~2-3 min, slow)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _timing import Timer, loglog_slope  # noqa: E402


class Work:
    def outer(self, inner_calls: int = 1):
        time.sleep(0.02)
        for _ in range(inner_calls):
            self.inner()
        return "done"

    def inner(self):
        time.sleep(0.03)


def test_timer_times_nested_calls_exclusively_and_restores_the_methods():
    work = Work()
    timer = Timer()
    timer.wrap(work, "outer", "outer")
    timer.wrap(work, "inner", "inner")
    assert work.outer(inner_calls=2) == "done"
    totals, calls, _ = timer.take()
    assert calls == {"outer": 1, "inner": 2}
    assert 0.015 <= totals["outer"] < 0.05  # its own sleep only, not the inner calls'
    assert 0.055 <= totals["inner"] < 0.12
    timer.restore()
    assert "outer" not in work.__dict__ and "inner" not in work.__dict__
    assert timer.take()[0] == {}


def test_an_opaque_part_keeps_the_time_of_the_timed_calls_inside_it():
    work = Work()
    counters = {"n": 0}
    timer = Timer(probe=lambda: counters)
    original_inner = work.inner

    def counting_inner():
        counters["n"] += 1
        original_inner()

    work.inner = counting_inner
    timer.wrap(work, "outer", "reverse", opaque=True)
    timer.wrap(work, "inner", "generation")
    work.outer(inner_calls=1)
    totals, calls, counts = timer.take()
    assert set(totals) == {"reverse"} and totals["reverse"] >= 0.045
    assert counts == {"reverse": {"n": 1}}
    work.inner()  # outside the opaque part: timed as its own part
    assert set(timer.take()[0]) == {"generation"}


def test_loglog_slope():
    assert loglog_slope([1, 2, 4], [3, 6, 12]) == pytest.approx(1.0)
    assert loglog_slope([1, 2, 4], [1, 4, 16]) == pytest.approx(2.0)


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    output = tmp_path / f"{script}.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), *args, "--output", str(output)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|" in done.stdout  # printed a table
    return json.loads(output.read_text())


@pytest.mark.slow
def test_step_breakdown_smallest(tmp_path):
    result = _run("step_breakdown", "--generations", "2", "--prompts", "1", "--warmup", "0", "--steps", "1",
                  "--max-completion-length", "4", tmp_path=tmp_path)
    assert {"command", "settings", "environment", "targets", "checks", "results"} <= set(result)
    (one,) = result["results"]
    assert one["num_generations"] == 2 and one["steps_measured"] == 1
    for part in ("generation", "reverse_pass", "sam2_decode", "logprob_forward", "backward", "rewards", "ema_update",
                 "other", "bookkeeping"):
        assert part in one["median_fraction"] and part in one["median_seconds"]
    assert one["median_seconds"]["generation"] > 0 and one["median_seconds"]["backward"] > 0
    assert set(one["encoder_images_per_unique_image"]) == {"vision_images", "sam_encoder_images"}


@pytest.mark.slow
def test_vs_trl_smallest(tmp_path):
    result = _run("vs_trl", "--generations", "2", "--prompts", "1", "--warmup", "0", "--steps", "1",
                  "--max-completion-length", "4", "--images", "4", tmp_path=tmp_path)
    body = result["result"]
    for key in ("median_ratio", "ratio_of_medians", "ours_seconds", "stock_seconds", "fairness", "target_met",
                "ours_part_fraction_median"):
        assert key in body
    assert len(body["ours_seconds"]) == len(body["stock_seconds"]) == 1
    fairness = body["fairness"]
    assert fairness["ours_num_tokens"] == fairness["stock_num_tokens"]  # same prompt and completion lengths
    assert fairness["ours_completion_length_mean"] == fairness["stock_completion_length_mean"] == 4


@pytest.mark.slow
def test_scaling_quick_one_axis(tmp_path):
    result = _run("scaling", "--quick", "--axes", "generations", tmp_path=tmp_path)
    axis = result["axes"]["generations"]
    assert [p["value"] for p in axis["points"]] == [2, 8]
    assert {"time_loglog_slope", "memory_delta_loglog_slope", "peak_rss_loglog_slope"} <= set(axis)
    assert all(p["step_seconds"] > 0 and p["maxrss_mb"] > 0 for p in axis["points"])
    assert "memory_method" in result


def test_position_oracle_scores_the_position_named():
    from policy_gradient_probe import position_oracle

    completions = ["a small red circle in the top left", "a small red circle in the center", "gibberish"]
    references = ["the little red circle at the upper left"] * 3
    assert position_oracle(completions=completions, caption=references) == [1.0, 0.0, 0.0]


def test_probe_weights_follow_their_definitions():
    from policy_gradient_probe import sample_weights

    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    signed = sample_weights(rewards, 4, "signed")
    assert signed[0] > 0 and (signed[1:4] < 0).all() and signed[4:].abs().max() < 1e-6  # a uniform group: 0
    torch.testing.assert_close(sample_weights(rewards, 4, "positive"), signed.clamp(min=0))
    assert torch.equal(sample_weights(rewards, 4, "correct"), rewards)
    torch.testing.assert_close(sample_weights(rewards, 4, "likelihood"), torch.tensor([3.0, -1, -1, -1, 0, 0, 0, 0]))


@pytest.mark.slow
def test_policy_gradient_probe_smallest(tmp_path):
    from policy_gradient_probe import main

    warm = str(BENCHMARKS.parent / "sa2va_trl" / "assets" / "tiny_warm")
    result = main(["--model", warm, "--steps", "2", "--prompts", "2", "--test-regions", "4", "--spread",
                   "--eval-every", "1", "--temperature", "0.7", "--out", str(tmp_path / "probe.json")])
    assert json.loads((tmp_path / "probe.json").read_text()) == result
    assert sum(result["spread"].values()) == 4 and [r["variant"] for r in result["runs"]] == [
        "signed", "positive", "correct", "likelihood"]
    for run in result["runs"]:
        assert 0.0 <= run["greedy_position_after"] <= 1.0 and sum(run["spread_after"].values()) == 4
        assert [step for step, _ in run["greedy_position_curve"]] == [1]


def test_evaluate_sharing_smallest(tmp_path):
    from evaluate_sharing import main

    result = main(["--images", "4", "--batch-size", "4", "--repeats", "1", "--output", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text()) == result
    assert result["identical_predictions"]
    assert result["per_call_vision_images"] == 3 * result["shared_vision_images"] > 0


def test_exact_binomial_p_by_hand():
    from paired_predictions import exact_binomial_p

    assert exact_binomial_p(0, 0) == 1.0
    assert exact_binomial_p(5, 0) == 2 / 32  # two-sided: 2 * P(X <= 0), n = 5
    assert abs(exact_binomial_p(1, 4) - 2 * 6 / 32) < 1e-12  # 2 * P(X <= 1) = 2 * (1 + 5) / 32


def test_paired_predictions_counts_fixed_and_broken_regions(tmp_path):
    from paired_predictions import compare, load_predictions

    ref = "a small red circle in the top left"
    def line(i, pred, iou):
        return {"source_id": "img0", "region_index": i, "num_regions": 2, "caption": ref, "pred_caption": pred, "iou": iou}

    base = [line(0, ref, 0.9), line(1, "a small red circle in the center", 0.5), line(2, ref, 0.7)]
    new = [line(0, "a small red square in the top left", 0.9), line(1, ref, 0.8), line(2, ref, 0.8)]
    paths = []
    for name, rows in (("base", base), ("new", new)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    result = compare(load_predictions(paths[0]), load_predictions(paths[1]))
    assert (result["exact_match"]["fixed"], result["exact_match"]["broken"]) == (1, 1)  # region 1 fixed, 0 broken
    assert (result["position"]["fixed"], result["position"]["broken"]) == (1, 0)
    assert (result["shape"]["fixed"], result["shape"]["broken"]) == (0, 1)
    assert (result["iou"]["up"], result["iou"]["down"]) == (2, 0)
    assert abs(result["iou"]["multi_shape_mean_change"] - (0.0 + 0.3 + 0.1) / 3) < 1e-9
    assert result["exact_match"]["image_z"] == 0.0 and result["exact_match"]["image_p"] == 1.0  # one image: 0 change


def test_paired_predictions_tests_exact_match_over_images():
    from paired_predictions import compare, format_comparison

    ref, wrong = "a small red circle in the top left", "a small red circle in the center"
    def line(image, i, pred):
        return {"source_id": image, "region_index": i, "num_regions": 2, "caption": ref, "pred_caption": pred}

    # exact-match change per region: image a +1, +1 (mean 1); image b +1, 0 (0.5); image c 0 -> image means 1, .5, 0
    base = [line("a", 0, wrong), line("a", 1, wrong), line("b", 0, wrong), line("b", 1, ref), line("c", 0, ref)]
    new = [line("a", 0, ref), line("a", 1, ref), line("b", 0, ref), line("b", 1, ref), line("c", 0, ref)]
    key = lambda rows: {(r["source_id"], r["region_index"]): r for r in rows}
    r = compare(key(base), key(new))["exact_match"]
    assert (r["fixed"], r["broken"]) == (3, 0)
    assert r["image_z"] == pytest.approx(0.5 / math.sqrt(0.25 / 3))  # image means 1, 0.5, 0: sd 0.5
    assert r["image_p"] == pytest.approx(math.erfc(r["image_z"] / math.sqrt(2)))
    assert "over images z=+1.7" in format_comparison("run", compare(key(base), key(new)))


def test_paired_predictions_tests_caption_likelihood_over_images(tmp_path):
    from paired_predictions import compare, format_comparison

    def line(image, i, p_caption, p_shape):
        return {"source_id": image, "region_index": i, "num_regions": 2, "caption": "x", "pred_caption": None,
                "caption_logprob": math.log(p_caption), "attribute_logprobs": {"shape": math.log(p_shape)}}

    # image a: +0.1 and +0.3 (mean +0.2); image b: +0.1; image c: 0.0 -> image means 0.2, 0.1, 0.0
    base = [line("a", 0, 0.5, 0.5), line("a", 1, 0.2, 0.5), line("b", 0, 0.4, 0.5), line("c", 0, 0.6, 0.5)]
    new = [line("a", 0, 0.6, 0.5), line("a", 1, 0.5, 0.5), line("b", 0, 0.5, 0.5), line("c", 0, 0.6, 0.5)]
    key = lambda rows: {(r["source_id"], r["region_index"]): r for r in rows}
    result = compare(key(base), key(new))
    r = result["caption_prob"]
    assert r["images"] == 3 and r["baseline_mean"] == pytest.approx(0.425) and r["mean"] == pytest.approx(0.55)
    assert r["z"] == pytest.approx(0.1 / math.sqrt(0.01 / 3))  # image means 0.2, 0.1, 0.0: sd 0.1
    assert r["p"] == pytest.approx(math.erfc(abs(r["z"]) / math.sqrt(2)))
    assert result["p_shape"]["z"] == 0.0 and result["p_shape"]["p"] == 1.0  # unchanged
    assert "exact_match" not in result and "caption_prob 0.5500 vs 0.4250 (+0.1250" in format_comparison("run", result)


def test_mask_iou_headroom_ceiling_and_buckets():
    from mask_iou_headroom import iou_buckets, upsampled_mask_ceiling

    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 8:40, 16:48] = True  # a large square
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    masks[1] = (yy - 30) ** 2 + (xx - 33) ** 2 <= 5**2  # a small disc
    assert upsampled_mask_ceiling(masks, low_res=16, steps=300).min() > 0.99  # 1/4 resolution draws both
    coarse = upsampled_mask_ceiling(masks, low_res=4, steps=300)  # 1/16: the disc falls between the samples
    assert coarse[0] > 0.9
    assert coarse[1] < 0.5
    assert iou_buckets([0.1, 0.85, 0.93, 0.97, 1.0]) == {
        "0.00-0.50": 1, "0.50-0.80": 0, "0.80-0.90": 1, "0.90-0.95": 1, "0.95-1.00": 2}


def test_mask_iou_headroom_main_labels_each_predictions_file(tmp_path):
    from mask_iou_headroom import main

    from sa2va_trl.data.synthetic import write_shapes_world

    write_shapes_world(str(tmp_path / "world"), n_train=1, n_validation=1, n_test=2)
    lines = [{"source_id": "a", "region_index": 0, "iou": 0.3}, {"source_id": "a", "region_index": 1, "iou": 0.97},
             {"source_id": "b", "region_index": 0, "iou": None}]
    (tmp_path / "warm.pred.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    result = main(["--data", str(tmp_path / "world"), "--steps", "50", "--output", str(tmp_path / "out.json"),
                   "--predictions", f"warm={tmp_path / 'warm.pred.jsonl'}"])
    assert result["split"] == "test" and result["regions"] >= 2 and 0.5 < result["ceiling_mean_iou"] <= 1.0
    assert result["warm"]["regions"] == 2  # the unscored region is left out
    assert result["warm"]["buckets"]["0.00-0.50"] == 1 and result["warm"]["buckets"]["0.95-1.00"] == 1
    assert json.loads((tmp_path / "out.json").read_text()) == result


def test_cycle_reward_sensitivity_classes_and_isolated_gaps():
    from cycle_reward_sensitivity import attribute_gaps, error_class

    from sa2va_trl.data.synthetic import parse_caption

    ref = parse_caption("a small red circle in the top left")
    exact = parse_caption("the little red circle at the upper left")
    wrong_shape = parse_caption("a small red square in the top left")
    wrong_both = parse_caption("a small red square in the center")
    assert error_class(ref, exact) == "exact" and error_class(ref, None) == "unparsed"
    assert error_class(ref, wrong_shape) == "shape wrong, position right"
    assert error_class(ref, wrong_both) == "position wrong"
    # One group: two exact samples, one wrong on the shape alone, one wrong on shape and position.
    group = [(ref, exact, 0.9, 0.6), (ref, exact, 0.7, 0.8), (ref, wrong_shape, 0.8, 0.4), (ref, wrong_both, 0.0, 0.2)]
    gaps = attribute_gaps([group, [(ref, exact, 0.9, 0.6)] * 4], meteor_weight=0.5)
    assert gaps["shape"]["mixed_groups"] == 0.5 and gaps["shape"]["compared_groups"] == 1
    assert gaps["shape"]["cycle_iou_gap"] == pytest.approx(0.8 - 0.8)  # the both-wrong sample is not compared
    assert gaps["shape"]["reward_gap"] == pytest.approx((0.8 + 0.5 * 0.7) - (0.8 + 0.5 * 0.4))
    assert gaps["position"]["mixed_groups"] == 0.5 and gaps["position"]["compared_groups"] == 0
    assert gaps["position"]["reward_gap"] is None and gaps["colour"]["mixed_groups"] == 0.0


@pytest.mark.slow
def test_cycle_reward_sensitivity_smallest(tmp_path):
    from cycle_reward_sensitivity import main

    result = main(["--images", "3", "--num-generations", "2", "--output", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text()) == result
    assert sum(c["share"] for c in result["samples_by_error"].values()) == pytest.approx(1.0)
    assert all(0.0 <= c["cycle_iou"] <= 1.0 for c in result["samples_by_error"].values())
    assert set(result["attributes"]) == {"position", "shape", "colour", "size"}
    share = result["position_wrong_names_another_region"]
    assert share is None or 0.0 <= share <= 1.0
