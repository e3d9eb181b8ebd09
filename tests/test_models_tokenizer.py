"""The offline tiny tokenizer: deterministic, special tokens, chat template, any text encodes."""

import pytest
from transformers import AutoTokenizer

from sa2va_trl.models import CHAT_TEMPLATES, build_tiny_tokenizer
from sa2va_trl.models.tokenizer import SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_deterministic(tokenizer):
    assert build_tiny_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_vocab_is_a_few_hundred(tokenizer):
    assert 300 <= len(tokenizer) <= 600


@pytest.mark.parametrize("token", ["<img>", "</img>", "<IMG_CONTEXT>", "<vp>", "</vp>", "[SEG]", "<|im_start|>", "<|im_end|>"])
def test_special_tokens_are_single_ids(tokenizer, token):
    ids = tokenizer("x" + token + "x", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids(token) in ids
    assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


def test_eos_pad_and_special_ids(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "left"
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))


@pytest.mark.parametrize(
    "text",
    ["a small red circle in the top left", "Zebra-crossing #42: naïve café ☂ 東京 😀", "\n\t  spaces  ", ""],
)
def test_any_text_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_captions_encode_compactly(tokenizer):
    # Trained on the shape world: a caption is a handful of tokens, not bytes.
    assert len(tokenizer("a small red circle in the top left")["input_ids"]) <= 10


def test_chat_template_matches_the_published_instruction(tokenizer):
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == CHAT_TEMPLATES["qwen_chat"]["INSTRUCTION"].format(input="Hello")


def test_skip_special_tokens_drops_seg(tokenizer):
    ids = tokenizer("Sure, [SEG].<|im_end|>")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Sure, ."


def test_save_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<img><IMG_CONTEXT></img>\nPlease segment the blue square in this image.[SEG]<|im_end|>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.eos_token_id == tokenizer.eos_token_id and loaded.padding_side == "left"
