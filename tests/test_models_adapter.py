"""The policy adapter: prompts, batched sampling vs the training forward, masks, counters, errors."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from sa2va_trl.models import PromptBatch, Sa2VAInputError, Sa2VAPolicy, build_tiny_model
from sa2va_trl.models.adapter import CAPTION_QUESTION, _get_token_logprobs


def _images_and_masks():
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 255, (96, 120, 3), dtype=np.uint8),
        rng.integers(0, 255, (128, 128, 3), dtype=np.uint8),
        rng.integers(0, 255, (64, 80, 3), dtype=np.uint8),
    ]
    masks = [np.zeros(image.shape[:2], bool) for image in images]
    masks[0][10:50, 20:60] = True
    masks[1][60:100, 60:120] = True
    masks[2][:, :40] = True
    return images, masks


def _favour_tokens(model, tokenizer, seg_bias, eos_bias):
    """Give the LM head a bias so [SEG] and the chat end are likely (a real nn.Linear bias)."""
    head = model.language_model.get_output_embeddings()
    head.bias = nn.Parameter(torch.zeros(head.out_features))
    with torch.no_grad():
        head.bias[tokenizer.convert_tokens_to_ids("[SEG]")] = seg_bias
        head.bias[tokenizer.eos_token_id] = eos_bias
    return model


@pytest.fixture(scope="module")
def policy():
    model, tokenizer = build_tiny_model(seed=0)
    return Sa2VAPolicy(model, tokenizer)


@pytest.fixture(scope="module")
def seg_policy():
    model, tokenizer = build_tiny_model(seed=1)
    return Sa2VAPolicy(_favour_tokens(model, tokenizer, seg_bias=3.0, eos_bias=2.0), tokenizer)


# --- prompts -------------------------------------------------------------------------------


def test_caption_prompt_holds_one_region_token_per_grid_cell(policy):
    images, masks = _images_and_masks()
    batch = policy.caption_prompts(images, masks)
    n = policy.core.config.num_image_token
    cells = batch.region_grids.sum(dim=(1, 2))
    nearest = [torch.nn.functional.interpolate(torch.from_numpy(m.astype(np.float32))[None, None], size=(8, 8)) for m in masks]
    assert cells.tolist() == [int(grid.sum()) for grid in nearest]
    context = (batch.input_ids == policy.img_context_token_id).sum(dim=1)
    assert context.tolist() == (n + cells).tolist()
    # Exactly the published text around the tokens.
    row = batch.input_ids[1][batch.attention_mask[1].bool()]
    text = policy.tokenizer.decode(row)
    ctx = "<IMG_CONTEXT>"
    expected = (
        "<|im_start|>user\n<img>" + ctx * n + "</img>\nThere are 1 part regions in the picture: region1<vp>"
        + ctx * int(cells[1]) + "</vp>.\n" + CAPTION_QUESTION + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text == expected
    assert batch.tasks == ["caption"] * 3 and batch.questions == [CAPTION_QUESTION] * 3


def test_segmentation_prompt_text_and_left_padding(policy):
    images, _ = _images_and_masks()
    batch = policy.segmentation_prompts(images[:2], ["a small red circle", "the thing on the left side of it"])
    n = policy.core.config.num_image_token
    lengths = batch.attention_mask.sum(dim=1)
    assert lengths[0] < lengths[1]
    assert batch.attention_mask[0, : batch.input_ids.shape[1] - lengths[0]].sum() == 0  # left padding
    assert (batch.input_ids[0][~batch.attention_mask[0].bool()] == policy.tokenizer.pad_token_id).all()
    text = policy.tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()])
    assert text == (
        "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * n
        + "</img>\nPlease segment a small red circle in this image.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not batch.region_grids.any()
    assert batch.image_sizes == [(96, 120), (128, 128)]


def test_identical_images_are_stored_once_and_repeat_shares_pixels(policy):
    images, masks = _images_and_masks()
    batch = policy.caption_prompts([images[0], images[0].copy(), images[1]], [masks[0], masks[0], masks[1]])
    assert batch.num_images == 2 and batch.image_index.tolist() == [0, 0, 1]
    repeated = batch.repeat(4)
    assert len(repeated) == 12 and repeated.image_index.tolist() == [0] * 8 + [1] * 4
    assert repeated.pixel_values.data_ptr() == batch.pixel_values.data_ptr()
    torch.testing.assert_close(repeated.input_ids[4:8], batch.input_ids[1:2].expand(4, -1))
    assert repeated.row_indices == [0] * 4 + [1] * 4 + [2] * 4


def test_grayscale_and_rgba_images_are_converted(policy):
    images, masks = _images_and_masks()
    gray = images[0][..., 0]
    rgba = np.concatenate([images[1], np.full(images[1].shape[:2] + (1,), 255, np.uint8)], axis=-1)
    batch = policy.caption_prompts([gray, rgba], masks[:2])
    assert batch.pixel_values.shape == (2, 3, 128, 128) and batch.sam_pixel_values.shape == (2, 3, 128, 128)


def test_mask_size_mismatch_names_row_and_field(policy):
    images, masks = _images_and_masks()
    with pytest.raises(Sa2VAInputError, match=r"row 11, field 'region_mask'.*64x80 but the image is 96x120"):
        policy.caption_prompts([images[1], images[0]], [masks[1], masks[2]], row_indices=[10, 11])


def test_empty_mask_names_row_and_field(policy):
    images, masks = _images_and_masks()
    with pytest.raises(Sa2VAInputError, match=r"row 1, field 'region_mask'.*empty"):
        policy.caption_prompts(images[:2], [masks[0], np.zeros((128, 128), bool)])


def test_region_under_min_cells_names_row_and_field():
    model, tokenizer = build_tiny_model(min_region_cells=4)
    policy = Sa2VAPolicy(model, tokenizer)
    image = np.zeros((128, 128, 3), np.uint8)
    small = np.zeros((128, 128), bool)
    small[:16, :32] = True  # 1 x 2 = 2 cells of 16 px
    with pytest.raises(Sa2VAInputError, match=r"row 5, field 'region_mask'.*2 cell\(s\).*min_region_cells=4"):
        policy.caption_prompts([image], [small], row_indices=[5])
    big = np.zeros((128, 128), bool)
    big[:32, :32] = True
    assert int(policy.caption_prompts([image], [big]).region_grids.sum()) == 4


def test_missing_image_and_bad_text_raise(policy):
    images, masks = _images_and_masks()
    with pytest.raises(Sa2VAInputError, match=r"row 1, field 'img'.*needs an image"):
        policy.segmentation_prompts([images[0], None], ["a", "b"])
    with pytest.raises(Sa2VAInputError, match=r"row 0, field 'img'"):
        policy.caption_prompts([None], [masks[0]])
    with pytest.raises(Sa2VAInputError, match=r"row 1, field 'text'"):
        policy.segmentation_prompts(images[:2], ["a", "  "])
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        policy.segmentation_prompts(images[:2], ["a"])


def test_tokenizer_without_sa2va_tokens_is_refused():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    model, _ = build_tiny_model()
    word_level = Tokenizer(models.WordLevel({"a": 0, "<pad>": 1}, unk_token="a"))
    bare = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>")
    with pytest.raises(ValueError, match=r"lacks the Sa2VA special tokens"):
        Sa2VAPolicy(model, bare)


# --- sampling vs the training forward --------------------------------------------------------


def test_get_token_logprobs_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    ids = torch.tensor([[1, 0]])
    expected = torch.tensor([[np.log(0.5), 1 - np.log(np.e + 1)]], dtype=torch.float32)
    torch.testing.assert_close(_get_token_logprobs(logits, ids), expected)


@pytest.mark.parametrize("task", ["caption", "segmentation"])
@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_sampling_logprobs_equal_training_forward(seg_policy, task, temperature):
    policy = seg_policy
    images, masks = _images_and_masks()
    if task == "caption":
        batch = policy.caption_prompts(images, masks)
    else:
        batch = policy.segmentation_prompts(images, ["red circle", "a large blue square in the top left", "x"])
    torch.manual_seed(3)
    rollout = policy.sample(batch, num_generations=4, max_new_tokens=10, temperature=temperature)
    assert rollout.completion_ids.shape[0] == 12 and rollout.num_generations == 4
    assert rollout.batch.image_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # Variable lengths: padding after the first eos is masked and holds the pad id.
    lengths = rollout.completion_mask.sum(dim=1)
    assert lengths.min() < lengths.max()
    assert (rollout.completion_ids[rollout.completion_mask == 0] == policy.pad_token_id).all()
    assert not rollout.logprobs[rollout.completion_mask == 0].any()
    finished = ~rollout.is_truncated
    assert finished.any()
    last_ids = rollout.completion_ids[torch.arange(12), lengths - 1]
    assert all(int(i) in policy.eos_token_ids for i in last_ids[finished])  # the eos is inside the mask
    assert (lengths[~finished] == rollout.completion_ids.shape[1]).all()
    out = policy.completion_logprobs(
        rollout.batch, rollout.completion_ids, rollout.completion_mask, temperature=temperature,
        with_entropy=True, with_seg_hidden=True,
    )
    assert (out.logprobs - rollout.logprobs).abs().max() <= 1e-4
    assert out.logprobs.requires_grad
    assert (out.entropies[rollout.completion_mask.bool()] > 0).all()
    torch.testing.assert_close(out.has_seg, rollout.has_seg)
    assert rollout.has_seg.any()  # the favoured [SEG] appears
    torch.testing.assert_close(out.seg_hidden.detach(), rollout.seg_hidden, atol=1e-4, rtol=1e-4)


def test_wrong_temperature_changes_logprobs(seg_policy):
    images, _ = _images_and_masks()
    batch = seg_policy.segmentation_prompts(images[:1], ["red"])
    rollout = seg_policy.sample(batch, num_generations=2, max_new_tokens=6, temperature=0.5)
    out = seg_policy.completion_logprobs(rollout.batch, rollout.completion_ids, rollout.completion_mask, temperature=1.0)
    assert (out.logprobs - rollout.logprobs).abs().max() > 1e-2


def test_seg_as_last_token_gets_its_hidden_state(seg_policy):
    images, _ = _images_and_masks()
    batch = seg_policy.segmentation_prompts(images[:2], ["red", "blue"])
    torch.manual_seed(0)
    rollout = seg_policy.sample(batch, num_generations=8, max_new_tokens=1, temperature=1.0)
    last = rollout.has_seg & (rollout.completion_ids[:, 0] == seg_policy.seg_token_id)
    assert last.any()
    out = seg_policy.completion_logprobs(rollout.batch, rollout.completion_ids, rollout.completion_mask, with_seg_hidden=True)
    torch.testing.assert_close(rollout.seg_hidden[last], out.seg_hidden.detach()[last], atol=1e-5, rtol=1e-4)
    assert rollout.seg_hidden[last].abs().sum(dim=1).min() > 0
    assert not rollout.seg_hidden[~rollout.has_seg].any()


def test_vision_tower_runs_once_per_unique_image(policy):
    images, masks = _images_and_masks()
    batch = policy.caption_prompts([images[0], images[1], images[0]], [masks[0], masks[1], masks[0]])
    policy.reset_counters()
    rollout = policy.sample(batch, num_generations=4, max_new_tokens=4)
    assert policy.counters["vision_calls"] == 1 and policy.counters["vision_images"] == 2
    assert policy.counters["completions"] == 12
    policy.completion_logprobs(rollout.batch, rollout.completion_ids, rollout.completion_mask)
    assert policy.counters["vision_calls"] == 2 and policy.counters["vision_images"] == 4


def test_selected_micro_batch_encodes_only_its_images(policy):
    images, masks = _images_and_masks()
    rollout = policy.sample(policy.caption_prompts(images, masks), num_generations=2, max_new_tokens=3)
    micro = rollout.batch.select([2, 3])  # both rows show image 1
    policy.reset_counters()
    full = policy.completion_logprobs(rollout.batch, rollout.completion_ids, rollout.completion_mask)
    part = policy.completion_logprobs(micro, rollout.completion_ids[2:4], rollout.completion_mask[2:4])
    assert policy.counters["vision_images"] == 3 + 1
    torch.testing.assert_close(part.logprobs, full.logprobs[2:4], atol=1e-5, rtol=1e-5)
    policy.decode_masks(micro, torch.zeros(2, 32))
    assert policy.counters["sam_encoder_images"] == 1


def test_frozen_vision_tower_runs_once_per_batch_across_sampling_and_training():
    model, tokenizer = build_tiny_model(seed=4)
    model.vision_model.requires_grad_(False)
    policy = Sa2VAPolicy(model, tokenizer)
    images, masks = _images_and_masks()
    batch = policy.caption_prompts(images, masks)
    rollout = policy.sample(batch, num_generations=3, max_new_tokens=4, temperature=0.8)
    out = policy.completion_logprobs(rollout.batch, rollout.completion_ids, rollout.completion_mask, temperature=0.8)
    assert policy.counters["vision_calls"] == 1 and policy.counters["vision_images"] == 3
    assert (out.logprobs - rollout.logprobs).abs().max() <= 1e-4
    out.logprobs.sum().backward()
    assert model.mlp1[1].weight.grad.abs().sum() > 0  # the projector still trains


def test_frozen_encoders_run_once_per_unique_image_across_batches():
    model, tokenizer = build_tiny_model(seed=5)
    model.vision_model.requires_grad_(False)
    model.grounding_encoder.vision_encoder.requires_grad_(False)
    policy = Sa2VAPolicy(model, tokenizer)
    images, masks = _images_and_masks()
    # A caption batch and a segmentation batch over the same 3 images (one shown twice).
    order = [0, 1, 2, 0]
    caption = policy.caption_prompts([images[i] for i in order], [masks[i] for i in order])
    segment = policy.segmentation_prompts([images[2], images[1], images[0]], ["a", "b", "c"])
    rollout = policy.sample(caption, num_generations=2, max_new_tokens=3)
    policy.completion_logprobs(rollout.batch, rollout.completion_ids, rollout.completion_mask)
    seg_rollout = policy.sample(segment, num_generations=2, max_new_tokens=3)
    out = policy.decode_masks(seg_rollout.batch, policy.seg_embeddings(seg_rollout.seg_hidden))
    policy.decode_masks(rollout.batch.select([4, 5]), torch.zeros(2, 32))
    assert policy.counters["vision_calls"] == 1 and policy.counters["vision_images"] == 3
    assert policy.counters["sam_encoder_calls"] == 1 and policy.counters["sam_encoder_images"] == 3
    # Cached features are the uncached ones (same order per batch), and masks equal a fresh policy's.
    fresh = Sa2VAPolicy(model, tokenizer)
    again = fresh.decode_masks(seg_rollout.batch, policy.seg_embeddings(seg_rollout.seg_hidden))
    torch.testing.assert_close(again.low_res_logits, out.low_res_logits, atol=0, rtol=0)
    fresh.remove_hooks()
    # The native SAM2 features after the encoder (conv_s0 / conv_s1, no-memory embedding) are those of
    # get_sam2_features bit for bit, and stay outside the cache: they train with the mask decoder.
    encode, finish = policy._sam2_stages()
    with torch.no_grad():
        whole = model.get_sam2_features(segment.sam_pixel_values)
        for split, expected in zip(finish(encode(segment.sam_pixel_values)), whole, strict=True):
            torch.testing.assert_close(split, expected, atol=0, rtol=0)
    model.grounding_encoder.mask_decoder.zero_grad()
    policy.decode_masks(segment, torch.randn(3, 32)).low_res_logits.sum().backward()
    assert model.grounding_encoder.mask_decoder.conv_s0.weight.grad.abs().sum() > 0
    policy.reset_counters()
    policy.clear_feature_cache()
    policy.sample(segment, num_generations=1, max_new_tokens=2)
    policy.decode_masks(segment, torch.zeros(3, 32))
    assert policy.counters["vision_images"] == 3 and policy.counters["sam_encoder_images"] == 3
    # The cache is bounded (oldest images dropped first).
    policy.feature_cache_size = 2
    policy.clear_feature_cache()
    policy.decode_masks(segment, torch.zeros(3, 32))
    assert len(policy._feature_cache) == 2


def test_trainable_encoder_is_never_cached():
    model, tokenizer = build_tiny_model(seed=6)
    policy = Sa2VAPolicy(model, tokenizer)  # every parameter trainable
    images, masks = _images_and_masks()
    batch = policy.segmentation_prompts(images, ["a", "b", "c"])
    policy.sample(batch, num_generations=1, max_new_tokens=2)
    policy.sample(policy.caption_prompts(images, masks), num_generations=1, max_new_tokens=2)
    policy.decode_masks(batch, torch.zeros(3, 32))
    policy.decode_masks(batch, torch.zeros(3, 32))
    assert policy.counters["vision_calls"] == 2 and policy.counters["sam_encoder_calls"] == 2
    assert not policy._feature_cache


def test_greedy_sampling_is_deterministic_and_matches_argmax(policy):
    images, masks = _images_and_masks()
    batch = policy.caption_prompts(images[:2], masks[:2])
    first = policy.sample(batch, num_generations=2, max_new_tokens=5, do_sample=False)
    second = policy.sample(batch, num_generations=1, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(first.completion_ids[::2], second.completion_ids)
    out = policy.completion_logprobs(first.batch, first.completion_ids, first.completion_mask)
    # Greedy picks the most likely token: its log-prob is the row maximum, i.e. >= log(1/V).
    assert (out.logprobs[first.completion_mask.bool()] >= -np.log(len(policy.tokenizer))).all()


def test_completion_logprobs_rejects_misaligned_inputs(policy):
    images, masks = _images_and_masks()
    batch = policy.caption_prompts(images[:2], masks[:2])
    with pytest.raises(ValueError, match=r"must both be \(2, T\)"):
        policy.completion_logprobs(batch, torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))


# --- masks -----------------------------------------------------------------------------------


def test_masks_at_image_size_and_sam_encoder_once_per_image(seg_policy):
    policy = seg_policy
    images, _ = _images_and_masks()
    batch = policy.segmentation_prompts(images, ["a", "b", "c"])
    torch.manual_seed(1)
    rollout = policy.sample(batch, num_generations=4, max_new_tokens=6)
    policy.reset_counters()
    has_seg = rollout.has_seg.clone()
    has_seg[0] = False
    embeddings = policy.seg_embeddings(rollout.seg_hidden)
    assert embeddings.shape == (12, 32)
    out = policy.decode_masks(rollout.batch, embeddings, has_seg)
    assert policy.counters["sam_encoder_calls"] == 1 and policy.counters["sam_encoder_images"] == 3
    assert [tuple(m.shape) for m in out.masks] == [image.shape[:2] for image in images for _ in range(4)]
    assert out.low_res_logits.shape == (12, 32, 32) and out.iou_scores.shape == (12,)
    assert out.num_without_seg == int((~has_seg).sum()) and not out.masks[0].any()
    assert policy.counters["masks_without_seg"] == out.num_without_seg
    for mask, logits in zip(out.masks[1:], out.mask_logits[1:]):
        torch.testing.assert_close(mask, logits > 0)
    # The frozen-encoder cache: a second decode of the same batch does not re-encode.
    for parameter in policy.core.grounding_encoder.vision_encoder.parameters():
        parameter.requires_grad_(False)
    try:
        policy.decode_masks(rollout.batch, embeddings, has_seg)
        policy.decode_masks(rollout.batch, embeddings, has_seg)
        assert policy.counters["sam_encoder_calls"] == 2
    finally:
        for parameter in policy.core.grounding_encoder.vision_encoder.parameters():
            parameter.requires_grad_(True)


def test_multimask_keeps_the_best_predicted_iou(policy):
    images, _ = _images_and_masks()
    batch = policy.segmentation_prompts(images[:2], ["a", "b"])
    core = policy.core
    embeddings = torch.randn(2, 32)
    with torch.no_grad():
        out = policy.decode_masks(batch, embeddings)
        features = core.get_sam2_features(batch.sam_pixel_values)
        sam = core.grounding_encoder
        sparse, dense = sam.prompt_encoder(
            input_points=torch.zeros(2, 1, 1, 2), input_labels=-torch.ones(2, 1, 1, dtype=torch.int32),
            input_boxes=None, input_masks=None,
        )
        sparse = torch.cat([sparse, embeddings[:, None, None]], dim=2)
        masks, iou, _, _ = sam.mask_decoder(
            image_embeddings=features[-1],
            image_positional_embeddings=sam.get_image_wide_positional_embeddings().repeat(2, 1, 1, 1),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
            high_resolution_features=features[:-1],
        )
    assert masks.shape[2] == 3
    best = iou[:, 0].argmax(dim=-1)
    torch.testing.assert_close(out.iou_scores, iou[:, 0].max(dim=-1).values)
    torch.testing.assert_close(out.low_res_logits, masks[torch.arange(2), 0, best])
    up = torch.nn.functional.interpolate(out.low_res_logits[:1, None], size=(96, 120), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.mask_logits[0], up[0, 0])


def test_gradients_reach_text_hidden_fcs_mask_decoder_and_seg_state(seg_policy):
    policy = seg_policy
    images, _ = _images_and_masks()
    batch = policy.segmentation_prompts(images[:2], ["a", "b"])
    tokenizer = policy.tokenizer
    replies = ["Sure, [SEG].<|im_end|>", "It is nothing.<|im_end|>"]  # the second has no [SEG]
    ids = [tokenizer(reply)["input_ids"] for reply in replies]
    completion_ids = torch.full((2, max(map(len, ids))), tokenizer.pad_token_id)
    completion_mask = torch.zeros_like(completion_ids)
    for row, row_ids in enumerate(ids):
        completion_ids[row, : len(row_ids)] = torch.tensor(row_ids)
        completion_mask[row, : len(row_ids)] = 1
    policy.core.zero_grad()
    out = policy.completion_logprobs(batch, completion_ids, completion_mask, with_seg_hidden=True)
    assert out.has_seg.tolist() == [True, False]
    seg_hidden = out.seg_hidden
    seg_hidden.retain_grad()
    masks = policy.decode_masks(batch, policy.seg_embeddings(seg_hidden), out.has_seg)
    assert not masks.masks[1].any() and masks.num_without_seg == 1
    loss = masks.mask_logits[0].sigmoid().mean() + masks.low_res_logits[1].mean()
    loss.backward()
    core = policy.core
    assert core.text_hidden_fcs[0].weight.grad.abs().sum() > 0
    assert core.text_hidden_fcs[2].weight.grad.abs().sum() > 0
    decoder = core.grounding_encoder.mask_decoder
    assert decoder.upscale_conv1.weight.grad.abs().sum() > 0
    assert decoder.transformer.layers[0].cross_attn_token_to_image.q_proj.weight.grad.abs().sum() > 0
    # Only the chosen mask token's hypernetwork gets a gradient (best of 3 by predicted IoU).
    hyper_grads = [mlp.layers[0].weight.grad for mlp in decoder.output_hypernetworks_mlps]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in hyper_grads) == 1
    assert seg_hidden.grad[0].abs().sum() > 0
    assert not seg_hidden.grad[1].any()  # a reply without [SEG] gives no mask gradient
    assert core.language_model.model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    policy.core.zero_grad()


def test_decode_masks_rejects_wrong_embedding_count(policy):
    images, _ = _images_and_masks()
    batch = policy.segmentation_prompts(images[:2], ["a", "b"])
    with pytest.raises(ValueError, match=r"prompt_embeddings must be \(2, D\)"):
        policy.decode_masks(batch, torch.zeros(3, 32))


# --- greedy conveniences ---------------------------------------------------------------------


def test_caption_and_segment_conveniences(seg_policy):
    images, masks = _images_and_masks()
    captions = seg_policy.caption(images, masks, max_new_tokens=4)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert seg_policy.caption(images, masks, max_new_tokens=4) == captions
    predicted = seg_policy.segment(images, ["red", "blue", "green"], max_new_tokens=3)
    assert [p.shape for p in predicted] == [image.shape[:2] for image in images]
    assert all(p.dtype == bool for p in predicted)


def test_from_pretrained_round_trip(policy, tmp_path):
    policy.model.save_pretrained(tmp_path)
    policy.tokenizer.save_pretrained(tmp_path)
    loaded = Sa2VAPolicy.from_pretrained(tmp_path)
    images, masks = _images_and_masks()
    assert loaded.caption(images[:1], masks[:1], max_new_tokens=4) == policy.caption(images[:1], masks[:1], max_new_tokens=4)


def test_prompt_batch_select_and_to(policy):
    images, masks = _images_and_masks()
    batch = policy.caption_prompts(images, masks, row_indices=[7, 8, 9])
    picked = batch.select([2, 0])
    assert isinstance(picked, PromptBatch) and picked.row_indices == [9, 7] and picked.image_index.tolist() == [2, 0]
    moved = batch.to("cpu")
    torch.testing.assert_close(moved.input_ids, batch.input_ids)


# --- wrappers the trainer uses -----------------------------------------------------------------


def test_gradient_checkpointing_keeps_sampling_and_training_equal():
    model, tokenizer = build_tiny_model(seed=2)
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy = Sa2VAPolicy(model, tokenizer)
    images, masks = _images_and_masks()
    batch = policy.caption_prompts(images[:2], masks[:2])
    rollout = policy.sample(batch, num_generations=2, max_new_tokens=6, temperature=0.9)
    out = policy.completion_logprobs(rollout.batch, rollout.completion_ids, rollout.completion_mask, temperature=0.9)
    assert (out.logprobs - rollout.logprobs).abs().max() <= 1e-4
    assert all(m.gradient_checkpointing for m in model.language_model.model.layers)  # restored after sampling
    out.logprobs.sum().backward()
    assert model.mlp1[1].weight.grad.abs().sum() > 0


def test_peft_lora_model_works_through_the_adapter():
    from peft import LoraConfig, get_peft_model

    model, tokenizer = build_tiny_model(seed=3)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    policy = Sa2VAPolicy(peft_model, tokenizer)
    images, _ = _images_and_masks()
    batch = policy.segmentation_prompts(images[:2], ["red", "blue"])
    rollout = policy.sample(batch, num_generations=2, max_new_tokens=5, temperature=0.8)
    out = policy.completion_logprobs(rollout.batch, rollout.completion_ids, rollout.completion_mask, temperature=0.8)
    assert (out.logprobs - rollout.logprobs).abs().max() <= 1e-4
    out.logprobs.sum().backward()
    lora = [p for name, p in peft_model.named_parameters() if "lora_A" in name]
    assert lora and all(p.grad is not None for p in lora)


def test_dynamic_tiling_prompts_sampling_and_training_agree():
    model, tokenizer = build_tiny_model(seed=5, dynamic_image_size=True, max_dynamic_patch=4)
    policy = Sa2VAPolicy(model, tokenizer)
    wide = np.random.default_rng(1).integers(0, 255, (128, 256, 3), dtype=np.uint8)  # 2 x 1 grid + thumbnail
    small = np.random.default_rng(2).integers(0, 255, (100, 100, 3), dtype=np.uint8)  # one tile
    mask_wide = np.zeros((128, 256), bool)
    mask_wide[:, :64] = True  # left quarter: 2 of 8 columns on the thumbnail's grid
    mask_small = np.ones((100, 100), bool)
    batch = policy.caption_prompts([wide, small], [mask_wide, mask_small])
    assert batch.tiles_per_image == [3, 1] and batch.tile_offsets == [0, 3, 4]
    assert batch.pixel_values.shape == (4, 3, 128, 128)
    context = (batch.input_ids == policy.img_context_token_id).sum(dim=1)
    assert context.tolist() == [3 * 64 + 16, 64 + 64]
    # Region tokens are copied from the last (thumbnail) tile of the image.
    with torch.no_grad():
        vit = model.extract_feature(batch.pixel_values)
        offsets = torch.tensor(batch.tile_offsets)
        embeds = model.build_inputs_embeds(batch.input_ids, vit, batch.image_index, batch.region_grids, offsets)
    slots = embeds[0][batch.input_ids[0] == policy.img_context_token_id]
    torch.testing.assert_close(slots[: 3 * 64], vit[:3].reshape(-1, vit.shape[-1]))
    torch.testing.assert_close(slots[3 * 64 :], vit[2][batch.region_grids[0].reshape(-1)])
    policy.reset_counters()
    rollout = policy.sample(batch, num_generations=2, max_new_tokens=5, temperature=1.2)
    assert policy.counters["vision_calls"] == 1 and policy.counters["vision_images"] == 4  # tiles
    out = policy.completion_logprobs(rollout.batch, rollout.completion_ids, rollout.completion_mask, temperature=1.2)
    assert (out.logprobs - rollout.logprobs).abs().max() <= 1e-4
    micro = rollout.batch.select([3])  # the one-tile image only
    part = policy.completion_logprobs(micro, rollout.completion_ids[3:], rollout.completion_mask[3:], temperature=1.2)
    torch.testing.assert_close(part.logprobs, out.logprobs[3:], atol=1e-5, rtol=1e-5)
    masks = policy.decode_masks(rollout.batch, torch.zeros(4, 32))
    assert [tuple(m.shape) for m in masks.masks] == [(128, 256)] * 2 + [(100, 100)] * 2


def test_model_generate_matches_greedy_policy_sampling(policy):
    images, masks = _images_and_masks()
    batch = policy.caption_prompts(images[:2], masks[:2])
    rollout = policy.sample(batch, num_generations=1, max_new_tokens=5, do_sample=False)
    sequences = policy.core.generate(
        batch.pixel_values, batch.input_ids, batch.attention_mask, batch.image_index, batch.region_grids,
        max_new_tokens=5, do_sample=False,
    )
    torch.testing.assert_close(sequences[:, : rollout.completion_ids.shape[1]], rollout.completion_ids)


def test_counting_hooks_ignore_deep_copies_and_can_be_removed():
    import copy

    model, tokenizer = build_tiny_model(seed=6)
    policy = Sa2VAPolicy(model, tokenizer)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.extract_feature(torch.zeros(1, 3, 128, 128))
    assert policy.counters["vision_calls"] == 0
    with torch.no_grad():
        model.extract_feature(torch.zeros(1, 3, 128, 128))
    assert policy.counters["vision_calls"] == 1
    policy.remove_hooks()
    with torch.no_grad():
        model.extract_feature(torch.zeros(1, 3, 128, 128))
    assert policy.counters["vision_calls"] == 1


def test_top_k_samples_inside_the_top_k_and_logprobs_stay_untruncated(policy):
    images, masks = _images_and_masks()
    batch = policy.caption_prompts(images[:2], masks[:2])
    torch.manual_seed(7)
    rollout = policy.sample(batch, num_generations=4, max_new_tokens=6, temperature=1.5, top_k=3, top_p=0.95)
    out = policy.completion_logprobs(rollout.batch, rollout.completion_ids, rollout.completion_mask, temperature=1.5)
    # Documented semantics: log-probs of the tempered, untruncated distribution (as TRL's loss uses).
    assert (out.logprobs - rollout.logprobs).abs().max() <= 1e-4
    # Yet every token was drawn from the top 3 of its step's distribution (full-vocabulary forward).
    b = rollout.batch
    input_ids = torch.cat([b.input_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([b.attention_mask, rollout.completion_mask], dim=1)
    with torch.no_grad():
        logits = policy.core(input_ids, attention_mask, b.pixel_values, b.image_index, b.region_grids).logits
    length, steps = b.input_ids.shape[1], rollout.completion_ids.shape[1]
    step_logits = logits[:, length - 1 : length - 1 + steps]
    chosen = step_logits.gather(-1, rollout.completion_ids.unsqueeze(-1))
    rank = (step_logits > chosen).sum(dim=-1)  # how many tokens beat the sampled one
    assert (rank[rollout.completion_mask.bool()] < 3).all()


def test_captionable_flags_masks_caption_prompts_would_reject():
    from sa2va_trl.models.tiny import build_tiny_model
    from sa2va_trl.models.adapter import Sa2VAPolicy

    model, tokenizer = build_tiny_model(seed=0)
    policy = Sa2VAPolicy(model, tokenizer)
    image = np.zeros((128, 128, 3), dtype=np.uint8)
    good = np.zeros((128, 128), dtype=bool)
    good[32:96, 32:96] = True
    empty = np.zeros((128, 128), dtype=bool)
    speck = np.zeros((128, 128), dtype=bool)
    speck[1, 1] = True  # misses every nearest-neighbour sample of the 8 x 8 grid
    wrong_size = np.ones((64, 64), dtype=bool)
    assert policy.captionable([image] * 4, [good, empty, speck, wrong_size]) == [True, False, False, False]
    policy.caption_prompts([image], [good])  # the accepted one really is accepted
    with pytest.raises(ValueError, match="region_mask"):
        policy.caption_prompts([image], [speck])


# --- per-row generators (the trainer's `per_sample_seeds`) -------------------------------------


def _generators(seeds):
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _completions(rollout):
    """Each row's completion tokens up to and including its eos."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]


def test_per_row_generators_make_each_sample_independent_of_batch_and_global_rng(seg_policy):
    policy = seg_policy
    images, masks = _images_and_masks()
    batch = policy.caption_prompts(images, masks)
    torch.manual_seed(0)
    whole = policy.sample(batch, num_generations=2, max_new_tokens=8, temperature=1.3,
                          generators=_generators(range(100, 106)))
    torch.manual_seed(1)  # another global RNG state, another batch around the row
    alone = policy.sample(batch.select([1]), num_generations=2, max_new_tokens=8, temperature=1.3,
                          generators=_generators([102, 103]))
    assert _completions(alone) == _completions(whole)[2:4]
    out = policy.completion_logprobs(whole.batch, whole.completion_ids, whole.completion_mask, temperature=1.3)
    assert (out.logprobs - whole.logprobs).abs().max() <= 1e-4  # the log-probs keep their meaning
    other = policy.sample(batch, num_generations=2, max_new_tokens=8, temperature=1.3,
                          generators=_generators(range(200, 206)))
    assert _completions(other) != _completions(whole)  # the seeds, not something else, pick the samples
    greedy = policy.sample(batch, num_generations=2, max_new_tokens=8, do_sample=False)
    top1 = policy.sample(batch, num_generations=2, max_new_tokens=8, temperature=1.3, top_k=1,
                         generators=_generators(range(6)))
    assert _completions(top1) == _completions(greedy)  # the warpers apply: top-k 1 is greedy
    with pytest.raises(ValueError, match="generators"):
        policy.sample(batch, num_generations=2, generators=_generators(range(5)))


def test_per_row_generators_draw_from_the_tempered_distribution():
    model, tokenizer = build_tiny_model(seed=2)
    head = model.language_model.get_output_embeddings()
    head.bias = nn.Parameter(torch.zeros(head.out_features))
    with torch.no_grad():
        head.bias[10:14] = torch.tensor([16.0, 15.0, 14.0, 13.0])  # four likely tokens, a long unlikely tail
    policy = Sa2VAPolicy(model, tokenizer)
    images, masks = _images_and_masks()
    batch = policy.caption_prompts(images[:1], masks[:1])
    n, temperature = 1000, 1.5
    rollout = policy.sample(batch, num_generations=n, max_new_tokens=1, temperature=temperature,
                            generators=_generators(range(n)))
    with torch.no_grad():
        logits = policy.core(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_index,
                             batch.region_grids).logits[0, -1]
    observed = torch.bincount(rollout.completion_ids[:, 0], minlength=logits.numel()).float() / n

    def distance(t):
        return 0.5 * (observed - torch.softmax(logits / t, dim=-1)).abs().sum().item()

    # Total variation of 1000 torch.multinomial draws from the tempered distribution (5 seeds): 0.015-0.030;
    # from the untempered one: 0.078-0.105. Here: 0.025 and 0.077.
    assert distance(temperature) < 0.04 and distance(1.0) > 0.06, (distance(temperature), distance(1.0))


def test_preserved_feature_cache_keeps_exactly_the_entries_it_found():
    model, tokenizer = build_tiny_model(seed=5)
    model.vision_model.requires_grad_(False)
    policy = Sa2VAPolicy(model, tokenizer)
    images, masks = _images_and_masks()
    policy.sample(policy.caption_prompts(images[:1], masks[:1]), num_generations=1, max_new_tokens=2)
    before = dict(policy._feature_cache)
    policy.feature_cache_size = 1  # the side computation would evict the entry it found
    with policy.preserved_feature_cache():
        policy.sample(policy.caption_prompts(images[1:], masks[1:]), num_generations=1, max_new_tokens=2)
        assert len(policy._feature_cache) == 1 and policy._feature_cache.keys() != before.keys()
    assert policy._feature_cache.keys() == before.keys()
    assert all(policy._feature_cache[k] is v for k, v in before.items())


@pytest.fixture(scope="module")
def warm_policy():
    from sa2va_trl.sft import tiny_warm_start_path

    return Sa2VAPolicy.from_pretrained(tiny_warm_start_path())


def test_caption_logprobs_equal_the_sampler_and_map_tokens_to_characters(warm_policy):
    """Scoring the greedy caption teacher-forced gives the log-probs it was generated with; spans cover its words."""
    from sa2va_trl.data.synthetic import generate_scene

    scene = generate_scene(5)
    images = [scene.image] * len(scene.masks)
    rollout = warm_policy.sample(warm_policy.caption_prompts(images, scene.masks), 1, 16, do_sample=False)
    captions = [text.strip() for text in rollout.completions]
    scores = warm_policy.caption_logprobs(images, scene.masks, captions)
    for row, (caption, score) in enumerate(zip(captions, scores)):
        n = int(rollout.completion_mask[row].sum())
        assert not rollout.is_truncated[row] and score.token_ids == rollout.completion_ids[row, :n].tolist()
        torch.testing.assert_close(torch.tensor(score.logprobs), rollout.logprobs[row, :n], rtol=0, atol=1e-5)
        assert score.spans[-1] == (len(caption), len(caption)) and len(score.spans) == n
        word = caption.split()[-1]  # the last word, then only the eos
        start = caption.rindex(word)
        assert score.span_logprob(start, len(caption)) == pytest.approx(sum(score.logprobs[:-1][-1:]))
        assert score.total == pytest.approx(sum(score.logprobs)) and score.total <= 0
    with pytest.raises(ValueError, match="1 captions for 2 region masks"):
        warm_policy.caption_logprobs(images[:2], scene.masks[:2], captions[:1])


def test_caption_logprobs_of_the_warm_start_prefer_the_true_colour(warm_policy):
    """The shipped warm start names colours almost perfectly: the true colour word is far likelier than a wrong one."""
    from sa2va_trl.data.synthetic import generate_scene

    warm = warm_policy
    scene = generate_scene(3)
    images = [scene.image] * len(scene.masks)
    wrong = [dataclasses.replace(a, colour="green" if a.colour != "green" else "blue") for a in scene.attributes]
    right = warm.caption_logprobs(images, scene.masks, [a.canonical_caption() for a in scene.attributes])
    other = warm.caption_logprobs(images, scene.masks, [a.canonical_caption() for a in wrong])
    for good_attributes, bad_attributes, good, bad in zip(scene.attributes, wrong, right, other):
        assert good.span_logprob(*good_attributes.canonical_spans()["colour"]) > np.log(0.5)
        assert bad.span_logprob(*bad_attributes.canonical_spans()["colour"]) < np.log(0.1)
        assert good.total > bad.total
