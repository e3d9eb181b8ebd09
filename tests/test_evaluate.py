"""The evaluation CLI: data loading (directories, recipes), batching, scoring and the JSON report.

Fast tests drive it with stand-in policies whose answers are known (an oracle, a "segment every
shape" policy, a policy that fails on one row); a slow test runs the real CLI on a saved tiny
random Sa2VA model and a tiny synthetic split.
"""

import contextlib
import json
import math
import re

import numpy as np
import pytest
import yaml

from sa2va_trl import evaluate as evaluate_module
from sa2va_trl.data import decode_region_mask
from sa2va_trl.data.synthetic import parse_caption, shapes_dataset, write_shapes_world
from sa2va_trl.evaluate import evaluate_policy, load_eval_rows, main, region_counts


def _key(image, other):
    return np.asarray(image).tobytes(), other


class OraclePolicy:
    """Answers with the ground truth of the rows it was built from; records its batch sizes."""

    def __init__(self, rows, corrupt_caption_rows=()):
        self.masks, self.captions, self.batch_sizes = {}, {}, []
        for index, row in enumerate(rows):
            mask = decode_region_mask(row)
            self.masks[_key(row["img"], row["caption"])] = mask
            caption = "a giant purple blob" if index in corrupt_caption_rows else row["caption"]
            self.captions[_key(row["img"], mask.tobytes())] = caption

    def caption(self, images, region_masks):
        self.batch_sizes.append(len(images))
        return [self.captions[_key(image, np.asarray(mask).tobytes())] for image, mask in zip(images, region_masks)]

    def segment(self, images, texts):
        return [self.masks[_key(image, text)] for image, text in zip(images, texts)]


class EveryShapePolicy(OraclePolicy):
    """Ignores the text and segments every shape: perfect on one-shape images only."""

    def segment(self, images, texts):
        return [np.asarray(image).any(axis=2) for image in images]


class FailingPolicy(OraclePolicy):
    """Rejects one caption (like the adapter rejecting a too-small region), so batches containing it fail."""

    def __init__(self, rows, bad_caption):
        super().__init__(rows)
        self.bad_caption = bad_caption

    def segment(self, images, texts):
        if self.bad_caption in texts:
            raise ValueError(f"row 0, field 'texts': cannot segment {self.bad_caption!r}")
        return super().segment(images, texts)


class WordLikelihoodPolicy(OraclePolicy):
    """Scores captions word by word: every word has probability 0.9, the word "circle" 0.2, the eos 1."""

    def __init__(self, rows):
        super().__init__(rows)
        self.scored = []

    def caption_logprobs(self, images, region_masks, captions):
        from sa2va_trl.models.adapter import CaptionScore

        self.scored.extend(captions)
        out = []
        for text in captions:
            words = list(re.finditer(r"\S+", text))
            logprobs = [math.log(0.2 if w.group() == "circle" else 0.9) for w in words] + [0.0]
            spans = [w.span() for w in words] + [(len(text), len(text))]
            out.append(CaptionScore(token_ids=list(range(len(spans))), logprobs=logprobs, spans=spans))
        return out


@pytest.fixture(scope="module")
def rows():
    return shapes_dataset(12, seed=0, split="test", image_size=64)


def test_oracle_scores_perfectly_and_calls_are_batched(rows):
    policy = OraclePolicy(rows)
    result = evaluate_policy(policy, rows, batch_size=5, progress=False)
    n = len(rows)
    assert policy.batch_sizes == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    seg = result["segmentation"]
    assert seg["mean_iou"] == 1.0 and seg["cumulative_iou"] == 1.0 and seg["precision@0.5"] == 1.0
    assert result["attributes"]["exact_match"] == 1.0
    assert result["attributes"]["accuracy"] == {"shape": 1.0, "colour": 1.0, "size": 1.0, "position": 1.0}
    assert result["captioning"]["meteor"] > 0.9
    assert result["num_samples"] == n and result["num_images"] == 12
    assert result["failed_rows"] == {}
    assert len(result["predictions"]) == n and result["predictions"][0]["iou"] == 1.0


def test_iou_by_number_of_regions_exposes_a_text_blind_policy(rows):
    result = evaluate_policy(EveryShapePolicy(rows), rows, batch_size=4, meteor=None, progress=False)
    by_n = result["segmentation"]["by_num_regions"]
    counts = region_counts(rows["source_id"])
    assert {int(k) for k in by_n} == set(counts)
    assert by_n["1"]["mean_iou"] == 1.0  # the only shape is "every shape"
    for n_regions in set(counts) - {1}:
        assert by_n[str(n_regions)]["mean_iou"] < 0.75
    assert result["captioning"]["meteor"] is None  # METEOR switched off, not silently zero
    assert result["attributes"]["exact_match"] == 1.0


def test_wrong_captions_lower_exact_match_and_attribute_accuracy(rows):
    result = evaluate_policy(OraclePolicy(rows, corrupt_caption_rows={0, 1}), rows, tasks=["captioning"],
                             meteor=None, progress=False)
    n = len(rows)
    assert result["segmentation"] is None
    assert result["attributes"]["exact_match"] == pytest.approx((n - 2) / n)
    assert result["attributes"]["accuracy"]["size"] == pytest.approx((n - 2) / n)
    assert result["attributes"]["unparsed_predictions"] == 2


def test_a_failing_row_costs_only_itself(rows):
    bad = rows[3]["caption"]
    result = evaluate_policy(FailingPolicy(rows, bad), rows, batch_size=4, meteor=None, progress=False)
    bad_rows = [i for i, c in enumerate(rows["caption"]) if c == bad]
    assert sorted(int(k) for k in result["failed_rows"]) == bad_rows
    ious = [p["iou"] for p in result["predictions"]]
    assert all(ious[i] == 0.0 for i in bad_rows)
    assert all(iou == 1.0 for i, iou in enumerate(ious) if i not in bad_rows)
    assert result["segmentation"]["empty_predictions"] == len(bad_rows)


def test_caption_likelihood_scores_canonical_captions_per_attribute(rows):
    policy = WordLikelihoodPolicy(rows)
    result = evaluate_policy(policy, rows, tasks=["caption_likelihood"], meteor=None, progress=False)
    canonical = [parse_caption(c).canonical_caption() for c in rows["caption"]]
    assert policy.scored == canonical  # paraphrases are scored in the canonical form the model writes
    is_circle = np.array([parse_caption(c).shape == "circle" for c in rows["caption"]])
    assert 0 < is_circle.sum() < len(rows)
    likelihood = result["caption_likelihood"]
    assert likelihood["count"] == len(rows) and likelihood["scored"] == "canonical caption"
    assert likelihood["attribute_prob"]["shape"] == pytest.approx(np.mean(np.where(is_circle, 0.2, 0.9)))
    centre = np.array([parse_caption(c).position == "center" for c in rows["caption"]])
    assert likelihood["attribute_prob"]["position"] == pytest.approx(np.mean(np.where(centre, 0.9, 0.81)))  # 2 words
    expected = np.mean([0.9 ** (len(c.split()) - 1) * (0.2 if f else 0.9) for c, f in zip(canonical, is_circle)])
    assert likelihood["caption_prob"] == pytest.approx(expected)
    assert result["captioning"] is None and result["segmentation"] is None
    line = result["predictions"][0]
    assert line["caption_tokens"] == len(canonical[0].split()) + 1
    assert line["attribute_logprobs"]["colour"] == pytest.approx(math.log(0.9))


def test_caption_likelihood_scores_free_text_references_as_given(rows):
    free = rows.map(lambda row, i: {"caption": f"object number {i}"}, with_indices=True)
    policy = WordLikelihoodPolicy(free)
    result = evaluate_policy(policy, free, tasks=["caption_likelihood"], meteor=None, progress=False)
    assert policy.scored == free["caption"]
    likelihood = result["caption_likelihood"]
    assert likelihood["scored"] == "reference caption" and likelihood["attribute_prob"] is None
    assert likelihood["caption_prob"] == pytest.approx(0.9 ** 3)
    assert likelihood["nll_per_token"] == pytest.approx(-3 * math.log(0.9) / 4)
    assert "attribute_logprobs" not in result["predictions"][0]


def test_caption_likelihood_needs_a_policy_with_token_logprobs(rows):
    with pytest.raises(ValueError, match="caption_logprobs"):
        evaluate_policy(OraclePolicy(rows), rows, tasks=["caption_likelihood"], meteor=None, progress=False)


def test_max_samples_keeps_region_counts_of_the_whole_image(tmp_path):
    write_shapes_world(str(tmp_path / "w"), n_train=1, n_validation=1, n_test=10, image_size=64, progress=False)
    full, full_counts, _ = load_eval_rows(str(tmp_path / "w"), split="test")
    cut, cut_counts, info = load_eval_rows(str(tmp_path / "w"), split="test", max_samples=3)
    assert len(cut) == 3 and info["format"] == "gar"
    assert cut_counts == full_counts[:3]
    assert cut_counts == region_counts(full["source_id"])[:3]


def test_recipe_yaml_data_sources(tmp_path):
    write_shapes_world(str(tmp_path / "w"), n_train=2, n_validation=2, n_test=3, image_size=64, progress=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"dataset_name": str(tmp_path / "w"), "dataset_format": "gar",
                                      "dataset_test_split": "validation", "learning_rate": 1e-6}))
    rows, _, info = load_eval_rows(str(recipe))  # the recipe's dataset_test_split is the default
    assert info["split"] == "validation"
    assert rows["source_id"][0].endswith("/validation:0")
    assert load_eval_rows(str(recipe), split="test")[2]["split"] == "test"  # an explicit --split wins
    synthetic = tmp_path / "synthetic.yaml"
    synthetic.write_text(yaml.safe_dump({"dataset_format": "synthetic", "synthetic_images": 16, "seed": 5}))
    rows, counts, info = load_eval_rows(str(synthetic))
    assert info["format"] == "synthetic" and info["split"] == "test"
    assert len(set(rows["source_id"])) == 4 and len(counts) == len(rows)
    assert rows["source_id"][0] == "shapes/test/0"  # held out from the trainer's validation split


def test_json_sources_are_scored_whole(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 12)).save(tmp_path / "images" / "a.png")
    (tmp_path / "annotations.json").write_text(json.dumps([{"image": "a.png", "mask": [[0, 0, 4, 0, 4, 4]]}]))
    rows, counts, info = load_eval_rows(str(tmp_path), split="test")
    assert len(rows) == 1 and counts == [1] and info["split"] is None and info["format"] == "annotations_json"


def test_cli_writes_strict_json_and_predictions(tmp_path, monkeypatch, capsys):
    write_shapes_world(str(tmp_path / "w"), n_train=1, n_validation=1, n_test=6, image_size=64, progress=False)
    rows, _, _ = load_eval_rows(str(tmp_path / "w"), split="test")
    monkeypatch.setattr(evaluate_module, "load_policy", lambda path: OraclePolicy(rows))
    out, preds = tmp_path / "out" / "result.json", tmp_path / "preds.jsonl"
    report = main(["--model", "unused", "--data", str(tmp_path / "w"), "--split", "test", "--batch-size", "3",
                   "--output", str(out), "--predictions", str(preds), "--max-samples", "5"])
    printed = capsys.readouterr().out
    assert "segmentation/mean_iou" in printed and "captioning/exact_match" in printed
    strict = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert strict["num_samples"] == 5 == report["num_samples"]
    assert strict["segmentation"]["mean_iou"] == 1.0
    assert strict["attributes"]["exact_match"] == 1.0
    assert strict["split"] == "test" and strict["format"] == "gar" and strict["skipped"] == {}
    assert "ious" not in strict["segmentation"] and "predictions" not in strict
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(lines) == 5 and lines[0]["pred_caption"] == lines[0]["caption"]
    assert {"source_id", "region_index", "num_regions", "iou", "meteor"} <= set(lines[0])


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["--model", "m", "--data", str(tmp_path), "--batch-size", "0"])
    with pytest.raises(SystemExit):
        main(["--model", "m"])  # --data is required


@pytest.mark.slow
def test_cli_end_to_end_on_a_saved_tiny_model(tmp_path):
    from sa2va_trl.models import build_tiny_model

    model, tokenizer = build_tiny_model(seed=0)
    model.save_pretrained(str(tmp_path / "model"))
    tokenizer.save_pretrained(str(tmp_path / "model"))
    write_shapes_world(str(tmp_path / "w"), n_train=1, n_validation=1, n_test=3, image_size=128, progress=False)
    out = tmp_path / "result.json"
    report = main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "w"), "--split", "test",
                   "--max-samples", "4", "--batch-size", "2", "--max-new-tokens", "6", "--output", str(out),
                   "--tasks", "segmentation,captioning,caption_likelihood"])
    saved = json.loads(out.read_text())
    assert saved["num_samples"] == report["num_samples"] == 4
    seg = saved["segmentation"]
    assert seg["count"] == 4 and 0.0 <= seg["mean_iou"] <= 1.0
    assert sum(group["count"] for group in seg["by_num_regions"].values()) == 4
    assert saved["attributes"]["count"] == 4  # the shapes world was recognised
    assert 0.0 <= saved["attributes"]["exact_match"] <= 1.0
    assert saved["captioning"]["count"] == 4
    likelihood = saved["caption_likelihood"]  # a random model: about uniform over the vocabulary
    assert likelihood["count"] == 4 and likelihood["nll_per_token"] > 1.0 and set(likelihood["attribute_prob"]) == {
        "shape", "colour", "size", "position"}


def test_load_policy_reads_the_shipped_warm_start_by_its_builtin_name():
    import torch

    from sa2va_trl.evaluate import load_policy
    from sa2va_trl.models import Sa2VAPolicy
    from sa2va_trl.sft import tiny_warm_start_path

    by_name = load_policy("builtin:tiny-warm").core.state_dict()
    by_path = Sa2VAPolicy.from_pretrained(tiny_warm_start_path()).core.state_dict()
    assert set(by_name) == set(by_path) and all(torch.equal(by_name[k], by_path[k]) for k in by_path)


@pytest.mark.slow
def test_load_policy_merges_a_lora_adapter_onto_its_base(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from sa2va_trl.evaluate import load_policy
    from sa2va_trl.models import Sa2VAModel, build_tiny_model

    model, tokenizer = build_tiny_model(seed=0)
    model.save_pretrained(str(tmp_path / "base"))
    tokenizer.save_pretrained(str(tmp_path / "base"))
    base = Sa2VAModel.from_pretrained(str(tmp_path / "base"))
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                           init_lora_weights=False))  # random B: the merge changes weights
    lora.save_pretrained(str(tmp_path / "adapter"))  # adapter files only, no tokenizer
    expected = lora.merge_and_unload().state_dict()
    policy = load_policy(str(tmp_path / "adapter"))
    loaded = policy.core.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)
    assert not torch.equal(loaded["language_model.model.layers.0.self_attn.q_proj.weight"],
                           model.state_dict()["language_model.model.layers.0.self_attn.q_proj.weight"])


def test_cli_fails_loudly_when_every_row_fails(tmp_path, monkeypatch):
    write_shapes_world(str(tmp_path / "w"), n_train=1, n_validation=1, n_test=2, image_size=64, progress=False)

    class Broken:
        def caption(self, images, region_masks):
            raise ValueError("broken model")

        segment = caption

    monkeypatch.setattr(evaluate_module, "load_policy", lambda path: Broken())
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit, match="every row failed.*broken model"):
        main(["--model", "x", "--data", str(tmp_path / "w"), "--no-meteor", "--output", str(out)])
    assert json.loads(out.read_text())["failed_rows"]  # the report is still written


def test_the_tasks_of_a_batch_share_each_images_encoder_pass_with_identical_results():
    """The shipped warm start loads with trainable parameters (the frozen-encoder cache alone would not apply):
    captioning, segmenting and scoring a batch encode each image once, the outputs equal per-call encoding,
    and no feature outlives the evaluation."""
    from sa2va_trl.evaluate import load_policy

    data = shapes_dataset(6, seed=3, split="test")  # the warm start's world: 128 px
    policy = load_policy("builtin:tiny-warm")
    assert any(p.requires_grad for p in policy.core.vision_model.parameters())
    tasks = ("segmentation", "captioning", "caption_likelihood")

    def run(shared: bool):
        policy.reset_counters()
        policy.clear_feature_cache()
        if not shared:  # every call encodes its images again (the behaviour before sharing)
            policy.shared_encoder_features = contextlib.nullcontext
        try:
            result = evaluate_policy(policy, data, batch_size=4, tasks=tasks, progress=False)
        finally:
            policy.__dict__.pop("shared_encoder_features", None)
        return result, dict(policy.counters), len(policy._feature_cache)

    shared, shared_counts, left = run(True)
    separate, separate_counts, _ = run(False)
    assert shared["predictions"] == separate["predictions"]  # captions, IoUs, log-probs: identical
    images_per_batch = [len(set(data["source_id"][i:i + 4])) for i in range(0, len(data), 4)]
    assert shared_counts["vision_images"] == sum(images_per_batch)  # one pass per image and batch
    assert separate_counts["vision_images"] == 3 * sum(images_per_batch)  # caption, segment, score: one each
    assert shared_counts["sam_encoder_images"] == separate_counts["sam_encoder_images"]  # segmenting only
    assert left == 0
