"""Locally built word-level tokenizers for the tiny models (no hub download).

The vocabulary covers the synthetic captions and the prompt words; anything else maps to ``<unk>``.
"""

from __future__ import annotations

from testkit.clips import COLORS, DIRECTIONS, SHAPES

CAPTION_WORDS = ["a", "moves", *COLORS, *SHAPES, *DIRECTIONS]
PROMPT_WORDS = ("you are helpful assistant system user describe the video in details detail what is shown this "
                ". , : ? ! ' # 1 2").split()

# Qwen3-VL's processor writes each temporal group's time as text before it ("<1.5 seconds>"); with digits
# split one by one (as Qwen's own tokenizers do) these words cover any timestamp.
TIMESTAMP_WORDS = [*"0123456789", ".", "<", ">", "seconds"]

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Same rendering as Qwen2-VL-Instruct's template: default system turn, one block per content item,
# <|vision_start|><|video_pad|><|vision_end|> for a video, and the assistant header as generation prompt.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' or 'video' in item %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def word_level_tokenizer(specials: list[str], words: list[str], *, bos: str | None, eos: str, pad: str,
                         unk: str = "<unk>", lowercase: bool = True, single_digits: bool = False):
    """A PreTrainedTokenizerFast over ``specials + words`` that splits on whitespace and punctuation
    (and, with ``single_digits``, between digits too)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in [*specials, unk, *words]:
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    if lowercase:
        tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if single_digits:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.Whitespace()])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    extra = [s for s in specials if s not in (bos, eos, pad)]
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk, additional_special_tokens=extra,
                                   model_input_names=["input_ids", "attention_mask"])


def qwen_tokenizer():
    tok = word_level_tokenizer(QWEN_SPECIALS, CAPTION_WORDS + PROMPT_WORDS, bos=None, eos="<|im_end|>",
                               pad="<|endoftext|>")
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def qwen3_tokenizer():
    """The Qwen2-VL tiny tokenizer's words, same ids, plus what Qwen3-VL's timestamps need (appended)."""
    tok = word_level_tokenizer(QWEN_SPECIALS, CAPTION_WORDS + PROMPT_WORDS + TIMESTAMP_WORDS, bos=None,
                               eos="<|im_end|>", pad="<|endoftext|>", single_digits=True)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok
