"""Tiny random Qwen3.6 / Qwen3.5 vision-language checkpoints in the exact Hugging Face layout.

The server is written against real checkpoints such as ``Qwen/Qwen3.5-27B`` or
``Qwen/Qwen3.6-27B`` (transformers class ``Qwen3_5ForConditionalGeneration``), which are far
too large for CPU tests.  This module writes a directory that is interchangeable with one of
those downloads -- same file names, same ``config.json`` schema, same safetensors key names,
a sharded ``model.safetensors.index.json``, a byte-level BPE tokenizer with the real special
tokens, the real chat-template semantics and the real image-processor settings -- but with a
few million random weights.  Every code path that loads, shards or serves the real model
(tensor-parallel slicing, weight streaming, chat templating, image preprocessing) can
therefore be exercised against it without special cases.

Usage::

    from ds_qwen_vision.checkpoint import build_checkpoint
    path = build_checkpoint("/tmp/qwen-tiny", preset="tiny", seed=0)

    python -m ds_qwen_vision.checkpoint --out /tmp/qwen-tiny [--preset tiny|loadtest]
        [--seed N] [--dtype float32|bfloat16]

``build_checkpoint`` is a cache: a directory that already holds a complete build with the
same preset, seed, dtype and builder version is returned untouched.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

# Marker written LAST into a finished checkpoint; its presence (with matching contents) is
# what makes a directory a valid cache entry.
MARKER_FILE = "ds_qwen_vision_build.json"
# Bump whenever the builder's output changes so that stale caches are rebuilt.
BUILDER_VERSION = 1

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# Qwen's added tokens in their real order: in the real vocabulary they follow the 248044
# byte-level BPE tokens (<|endoftext|> = 248044, <|vision_start|> = 248053,
# <|image_pad|> = 248056, ...), so here they follow the trained BPE vocabulary in the same
# order, which keeps the relative offsets (image = vision_start + 3, ...) identical.
# The bool is the ``special`` flag: the tool / think markers are ordinary added tokens in the
# real tokenizer, so ``skip_special_tokens=True`` keeps them in decoded text.
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]

# Number of byte-level BPE tokens to learn (256 byte symbols + merges).
BPE_VOCAB_SIZE = 1280

# Qwen3.5's pre-tokenizer split (the same string transformers' Qwen3_5Tokenizer hard-codes):
# unlike Qwen2's it keeps combining marks (\p{M}) attached to letters and splits digits one
# by one.  Training with the identical split guarantees that the tokenizer.json we write and
# the pipeline Qwen3_5Tokenizer rebuilds from it at load time tokenize identically.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Deterministic training text.  English prose dominates (so common words become single
# tokens), while the multilingual part contains CJK, accented Latin, Cyrillic, Arabic and
# emoji: frequent multi-byte characters get merged into whole-character tokens, rare ones
# stay split across several byte tokens -- exactly the situation incremental (streaming)
# detokenization has to handle.
_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A small model can still learn the shape of a
language, even when it has only read a few pages of text. This paragraph exists to give the
tokenizer something ordinary to chew on: articles, pronouns, verbs and the punctuation that
glues them together.

Once upon a time, in a village between two rivers, there lived a clockmaker who repaired
every clock in town. Each morning she opened her shop at seven, made a cup of tea, and
listened to the ticking of a hundred machines. Some were fast, some were slow, and one old
clock in the corner had not moved its hands in thirty years. People asked her why she kept
it. "Because it is right twice a day," she said, "and that is more than most of us."

Describe the image in detail. What is shown in the picture? How many people are there, and
what are they doing? The photo shows a red car parked next to a blue house. A cat is
sleeping on the window sill, and two children are playing with a yellow ball in the garden.
The sky is bright and there are a few white clouds above the trees.

Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many legs does a spider have? Answer: A spider has eight legs.
Question: What is 12 plus 30? Answer: 12 plus 30 is 42.
Question: Which planet is known as the red planet? Answer: Mars is known as the red planet.

You are a helpful assistant. Please answer the user's questions accurately and concisely.
If you do not know the answer, say that you do not know. Think step by step before you
answer, and explain your reasoning when it helps the user understand the result.

def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"fib({i}) = {fibonacci(i)}")

The server receives a request, applies the chat template, tokenizes the prompt, runs the
model, and streams the generated tokens back to the client. Each token is decoded and sent
as soon as it is ready, so the user sees the answer appear word by word. Large models are
split across several GPUs with tensor parallelism: every layer's weights are divided into
slices, each GPU computes its part, and the partial results are combined with an all-reduce.

Weather report: on Monday it will be sunny with a high of 24 degrees. On Tuesday clouds
will move in from the west, and on Wednesday there is a chance of rain in the afternoon.
Thursday and Friday will be windy and cool, with temperatures between 12 and 18 degrees.
"""

_MULTILINGUAL = """\
中文：今天天气很好，我们一起去公园散步吧。这张图片里有一只猫和一只狗。请描述这张图片。
人工智能正在改变世界。模型可以理解文字和图像。你好，世界！谢谢你的帮助。
日本語：今日はいい天気ですね。この画像には猫が写っています。ありがとうございます。
한국어: 안녕하세요. 오늘 날씨가 좋네요. 이 사진에는 고양이가 있습니다. 감사합니다.
Français : « Où est la bibliothèque ? » demanda-t-il. L'été dernier, nous sommes allés à
la mer ; c'était très agréable. Ça coûte combien ? Déjà vu, café crème, crêpe, naïve.
Deutsch: Grüße aus München! Die Straße ist schön, und das Wetter ist heute großartig.
Español: ¿Dónde está la estación? ¡Qué bonito día! El niño comió una piña en la mañana.
Português: Não sei, mas a canção é ótima. Ação, coração, informação, São Paulo.
Tiếng Việt: Xin chào! Hôm nay trời đẹp quá. Cảm ơn bạn rất nhiều.
Русский: Привет, мир! Сегодня хорошая погода. Спасибо за помощь.
العربية: مرحبا بالعالم. شكرا جزيلا.
Emoji: 😀 😂 👍 🎉 🚀 ❤️ 🐱 🐶 🌍 ✨ 🔥 👋🏽 🇫🇷 👨‍👩‍👧 — smile 😀, party 🎉, rocket 🚀!
Math: α + β = γ, ∑ x² ≤ ∞, π ≈ 3.14159, ½ × 4 = 2, 30 °C, 100 €, £5, ¥1000.
"""

# Lines repeated so that the commonest CJK characters / accented letters / one emoji are
# frequent enough to earn their own merged tokens, while the rest of the multilingual text
# above appears once and stays byte-split.
_REPEATED = """\
你好，世界！这张图片里有一只猫。你好！图片。谢谢。
café, été, naïve, Grüße, straße, niño, ação 😀 🎉
"""


def _training_corpus() -> list[str]:
    """Training text for the BPE model, deterministic (no randomness, no external data)."""
    return [_ENGLISH] * 3 + [_MULTILINGUAL] * 2 + [_REPEATED] * 6


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE and return its serialized ``tokenizer.json``.

    Training on a fixed corpus with a single thread makes the result byte-for-byte
    reproducible; it is cached because config ids, the vocab size and the written files all
    derive from it.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # Same normalizer / pre-tokenizer / decoder as the real Qwen3.5 tokenizer.json (and as
    # transformers' Qwen3_5Tokenizer rebuilds it).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        # All 256 byte symbols, so any UTF-8 input is representable (no unknown tokens).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # The Rust trainer parallelises word counting; merge order is tie-broken
    # deterministically, but pin a single thread anyway so reproducibility does not depend on
    # scheduling.  (The variable is only read when the pool is first created.)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    base = tok.get_vocab_size()
    tok.add_tokens(
        [
            AddedToken(text, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for text, special in ADDED_TOKENS
        ]
    )
    # add_tokens appends in order right after the trained vocabulary.
    assert tok.token_to_id(ADDED_TOKENS[0][0]) == base
    return tok.to_str(pretty=True)


@functools.lru_cache(maxsize=1)
def token_ids() -> dict[str, int]:
    """Ids of every added token (``"<|image_pad|>" -> id``) plus ``"__len__"``, the tokenizer length."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_tokenizer_json())
    ids = {text: tok.token_to_id(text) for text, _ in ADDED_TOKENS}
    ids["__len__"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


# ---------------------------------------------------------------------------------------------
# Model configuration
# ---------------------------------------------------------------------------------------------

# Shapes of the real Qwen3.6-27B / Qwen3.5-27B for reference (the presets keep its ratios):
#   text:   64 layers = 16 x (3 linear_attention + 1 full_attention), hidden 5120,
#           intermediate 17408, 24 q heads / 4 kv heads of head_dim 256 (q_proj also emits the
#           output gate, so it is 2 x 24 x 256 wide), Gated DeltaNet with 16 key heads and
#           48 value heads of dim 128, conv kernel 4, partial rotary 0.25 with interleaved
#           M-RoPE sections [11, 11, 10], vocab 248320, untied lm_head;
#   vision: depth 27, hidden 1152, 16 heads, intermediate 4304, patch 16, temporal patch 2,
#           spatial merge 2, 2304 (= 48 x 48) learned position embeddings,
#           out_hidden_size = text hidden.
PRESETS: dict[str, dict] = {
    # Fast fp32 CPU equivalence tests at tp=2 and tp=4: ~3M parameters, every head count is
    # divisible by 4 (q 24, kv 4, GDN key 4 / value 12, vision 4) and the vocab by 64.
    "tiny": dict(
        text=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=8,
            num_attention_heads=24,
            num_key_value_heads=4,
            head_dim=32,
            linear_num_key_heads=4,
            linear_num_value_heads=12,
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            # rotary dim = 32 * 0.25 = 8 -> 4 frequencies split over (t, h, w).
            mrope_section=[2, 1, 1],
        ),
        vision=dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=128, num_position_embeddings=64),
        min_vocab=0,
        max_shard_size="2MB",
    ),
    # Loading-memory measurements: ~90M parameters (~360 MB in fp32, ~180 MB in bf16).
    "loadtest": dict(
        text=dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=24,
            num_key_value_heads=4,
            head_dim=64,
            linear_num_key_heads=8,
            linear_num_value_heads=24,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            # rotary dim = 64 * 0.25 = 16 -> 8 frequencies, ~ the real 11:11:10 split.
            mrope_section=[3, 3, 2],
        ),
        vision=dict(depth=4, hidden_size=256, num_heads=4, intermediate_size=1024, num_position_embeddings=256),
        # Rows beyond the tokenizer are never produced by it but make the embedding / lm_head
        # matrices realistically large relative to the layers.
        min_vocab=32768,
        max_shard_size="100MB",
    ),
}


def make_config(preset: str = "tiny"):
    """The ``Qwen3_5Config`` of a preset, with token ids that match the generated tokenizer."""
    from transformers import Qwen3_5Config

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    text = dict(spec["text"])
    mrope_section = text.pop("mrope_section")
    ids = token_ids()
    # Round up to a multiple of 64 like the real 248320 (= tokenizer length padded); this also
    # keeps it divisible by every tensor-parallel degree we test (lm_head is split by rows).
    vocab_size = _round_up(max(ids["__len__"], spec["min_vocab"]), 64)
    num_layers = text["num_hidden_layers"]
    text_config = dict(
        text,
        vocab_size=vocab_size,
        # Every 4th layer is full attention, the others Gated DeltaNet (linear attention).
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(num_layers)],
        linear_conv_kernel_dim=4,
        hidden_act="silu",
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        attention_bias=False,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000,
            "partial_rotary_factor": 0.25,
            "mrope_section": mrope_section,
            "mrope_interleaved": True,
        },
        # As in the real text_config: eos is <|endoftext|>, no bos / pad.
        eos_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
        pad_token_id=None,
    )
    vision_config = dict(
        spec["vision"],
        hidden_act="gelu_pytorch_tanh",
        in_channels=3,
        patch_size=16,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=text["hidden_size"],
    )
    config = Qwen3_5Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    return config
