"""An offline tokenizer for tiny Sa2VA configs: byte-level BPE trained in-process.

Built with the `tokenizers` library from a small fixed corpus (the Sa2VA prompt templates and
shape-world captions), so it needs no Hub access, is the same on every machine (BPE training
on a fixed corpus is deterministic), and encodes any text (byte-level: unknown words fall back
to bytes). It holds the published model's special tokens and a Qwen-style chat template whose
turn end `<|im_end|>` is the eos token. It saves and loads as a `PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import itertools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .configuration_sa2va import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    SEG_TOKEN,
    VP_END_TOKEN,
    VP_START_TOKEN,
)

PAD_TOKEN = "<|endoftext|>"
CHAT_START_TOKEN = "<|im_start|>"
CHAT_END_TOKEN = "<|im_end|>"

# Order fixes the ids: 0 = pad, then the chat markers, then the Sa2VA tokens.
SPECIAL_TOKENS = [
    PAD_TOKEN,
    CHAT_START_TOKEN,
    CHAT_END_TOKEN,
    IMG_START_TOKEN,
    IMG_END_TOKEN,
    IMG_CONTEXT_TOKEN,
    VP_START_TOKEN,
    VP_END_TOKEN,
    SEG_TOKEN,
    "<p>",
    "</p>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<quad>",
    "</quad>",
]

# Qwen-style template: same text as the "qwen_chat" INSTRUCTION of the published model.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SIZES = ("small", "large")
_COLOURS = ("red", "green", "blue", "yellow")
_SHAPES = ("circle", "square", "triangle")
_POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")


def training_corpus() -> list[str]:
    """The fixed corpus the tiny tokenizer is trained on (templates + shape-world captions)."""
    captions = [
        f"a {size} {colour} {shape} in the {position}"
        for size, colour, shape, position in itertools.product(_SIZES, _COLOURS, _SHAPES, _POSITIONS)
    ]
    templates = [
        "There are 1 part regions in the picture: region1.",
        "Please give me a short description of the region in the picture marked by region1.",
        "Please segment {} in this image.",
        "Sure, it is [SEG].",
        "Sure, [SEG].",
        "It is [SEG].",
        "The region shows nothing.",
        "user assistant system",
    ]
    lines = list(templates)
    for caption in captions:
        lines.append(caption)
        lines.append(f"Please segment {caption} in this image.")
        lines.append(caption.capitalize() + ".")
    return lines


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train the offline byte-level BPE tokenizer (deterministic) and wrap it for transformers.

    Args:
        vocab_size: target vocabulary size including the 256 byte symbols and special tokens.

    Returns:
        A `PreTrainedTokenizerFast` with pad `<|endoftext|>`, eos `<|im_end|>`, the Sa2VA
        special tokens and a chat template; `padding_side="left"` (generation batches).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=CHAT_END_TOKEN,
        extra_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=4096,
    )
