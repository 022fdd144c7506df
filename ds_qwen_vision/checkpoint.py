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
BUILDER_VERSION = 3  # 3: the mtp.* head

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

    The trainer breaks ties in merge order deterministically (checked: identical output for
    any number of worker threads), so a fixed corpus gives a byte-identical file.  Cached
    because the config's token ids, the vocab size and the written files all derive from it.
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
    # Loading-memory measurements: ~86M parameters (~345 MB in fp32, ~172 MB in bf16).
    # The real Qwen3.6-27B shapes, for benchmarks that generate random weights per rank (never saved:
    # ~54 GB in bf16).
    "27b": dict(
        text=dict(
            hidden_size=5120,
            intermediate_size=17408,
            num_hidden_layers=64,
            num_attention_heads=24,
            num_key_value_heads=4,
            head_dim=256,
            linear_num_key_heads=16,
            linear_num_value_heads=48,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            mrope_section=[11, 11, 10],
        ),
        vision=dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, num_position_embeddings=2304),
        min_vocab=248320,
        max_shard_size="5GB",
    ),
    "loadtest": dict(
        text=dict(
            hidden_size=640,
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
        # matrices (the largest single tensors, as in the real model) realistically big.
        min_vocab=16384,
        max_shard_size="100MB",
    ),
}


def make_config(preset: str = "tiny", mtp: bool = True):
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
        # As Qwen3.6-27B's text_config: one MTP layer (mtp.*), sharing embed_tokens and lm_head.
        mtp_num_hidden_layers=1 if mtp else 0,
        mtp_use_dedicated_embeddings=False,
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


# ---------------------------------------------------------------------------------------------
# Chat template, tokenizer / processor / generation configs
# ---------------------------------------------------------------------------------------------

# Modeled on the chat template shipped with Qwen3.6 (Qwen3.5 plus ``preserve_thinking``).
# What it reproduces:
#   * ChatML turns ``<|im_start|>{role}\n{content}<|im_end|>\n``; content is a string or a
#     list of parts: image / image_url parts -> ``<|vision_start|><|image_pad|><|vision_end|>``,
#     video parts -> ``<|vision_start|><|video_pad|><|vision_end|>``, text parts -> their
#     text (``add_vision_id`` prefixes "Picture N: " / "Video N: ");
#   * an optional leading system message (merged into the tools preamble when tools are given);
#   * assistant turns: reasoning comes from ``reasoning_content`` or from a ``<think>...</think>``
#     prefix of the content; it is re-emitted only for turns after the last real user query
#     (or for every turn with ``preserve_thinking=true``) and stripped from earlier history;
#     tool calls are rendered in Qwen3.5's XML-ish ``<tool_call><function=...>`` format;
#   * ``tool`` messages become ``<tool_response>`` blocks inside a user turn (the tools
#     preamble keeps the real structure and call-format example, with shorter prose);
#   * ``add_generation_prompt`` appends ``<|im_start|>assistant\n`` followed by ``<think>\n``
#     (thinking, the default) or an empty ``<think>\n\n</think>\n\n`` when
#     ``enable_thinking=false``.
CHAT_TEMPLATE = r"""{%- set counts = namespace(images=0, videos=0) %}
{%- macro render_content(content, count_vision, in_system=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for part in content %}
            {%- if 'image' in part or 'image_url' in part or part.type == 'image' %}
                {%- if in_system %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if count_vision %}
                    {%- set counts.images = counts.images + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ counts.images ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in part or part.type == 'video' %}
                {%- if in_system %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if count_vision %}
                    {%- set counts.videos = counts.videos + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ counts.videos ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in part %}
                {{- part.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n</tool_call>' }}
    {%- if messages[0].role == 'system' %}
        {%- set system_text = render_content(messages[0].content, false, true)|trim %}
        {%- if system_text %}
            {{- '\n\n' + system_text }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + render_content(messages[0].content, false, true)|trim + '<|im_end|>\n' }}
{%- endif %}
{#- Index of the last user message that is a real query (not a wrapped tool response):
    reasoning is kept only for assistant turns after it. #}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' %}
        {%- set user_text = render_content(message.content, false)|trim %}
        {%- if not (user_text.startswith('<tool_response>') and user_text.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- set reasoning = reasoning|trim %}
        {%- if (preserve_thinking is defined and preserve_thinking is true) or loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if not loop.first %}
                    {{- '\n' }}
                {%- elif content|trim %}
                    {{- '\n\n' }}
                {%- endif %}
                {{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- if tool_call.arguments is mapping %}
                    {%- for name, value in tool_call.arguments|items %}
                        {%- if value is mapping or (value is sequence and value is not string) %}
                            {%- set value = value | tojson %}
                        {%- endif %}
                        {{- '<parameter=' + name + '>\n' + value | string + '\n</parameter>\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}
"""


def _tokenizer_config() -> dict:
    """``tokenizer_config.json`` as transformers 5 writes it for the real Qwen3.5 tokenizer.

    ``tokenizer_class`` says ``Qwen2Tokenizer`` like the Hub files; transformers 5 maps model
    type ``qwen3_5`` to ``Qwen3_5Tokenizer`` regardless (qwen3_5 is in its list of models with
    an "incorrect hub tokenizer class").  The vision token attributes let
    ``Qwen3VLProcessor`` read them off the tokenizer.
    """
    vision_tokens = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    }
    return {
        "add_prefix_space": False,
        "backend": "tokenizers",
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        **vision_tokens,
        "model_max_length": 262144,
        "model_specific_special_tokens": vision_tokens,
        "pad_token": "<|endoftext|>",
        "pretokenize_regex": PRETOKENIZE_REGEX,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# Image / video processor settings of the real Qwen3.5 checkpoints.  ``size`` is in pixels:
# shortest_edge = min_pixels (256 x 256), longest_edge = max_pixels (4096 x 4096); images are
# resized to multiples of patch_size * merge_size = 32.
PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
VIDEO_PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "video_processor_type": "Qwen3VLVideoProcessor",
}


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

# Standard deviation of the lm_head rows in units of 1/sqrt(hidden): the final RMSNorm makes the
# hidden state ~unit RMS, so logits get a std of about this value.  A wide logit spread gives
# greedy decoding typical top-1/top-2 gaps far above fp32 (and usually bf16) rounding noise,
# and with random untied rows the argmax follows the context instead of one dominant row.
LOGIT_SCALE = 4.0


def _never_generated_ids(vocab_size: int) -> list[int]:
    """Vocabulary rows the random model must not produce (see ``_randomize_``)."""
    ids = token_ids()
    vision = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    return [ids[t] for t in vision] + list(range(ids["__len__"], vocab_size))


def _randomize_(model, seed: int, device: str = "cpu") -> None:
    """Overwrite every parameter with deterministic random values (in place).

    transformers' own init leaves RMSNorms at zero / one, biases at zero and draws matrices
    with std 0.02, which at these tiny widths makes every layer a near no-op -- a
    tensor-parallel bug inside a layer would then barely move the logits.  Instead matrices
    use std 1/sqrt(fan_in) so each sub-layer contributes O(1) to the residual stream
    (for the loadtest width this is ~0.02-0.04, the usual scale), and every norm / bias / GDN
    parameter gets non-trivial values so that slicing mistakes cannot hide behind constants.
    Parameters are visited in module order with one generator, so the result only depends on
    the seed and the architecture.
    """
    from torch import nn
    from transformers.models.qwen3_5 import modeling_qwen3_5 as mq

    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(shape, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device) * std + mean

    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            shape = param.shape
            if isinstance(module, mq.Qwen3_5RMSNormGated):
                # The gated GDN output norm multiplies by the weight directly: centre on 1.
                value = normal(shape, 0.1, 1.0)
            elif isinstance(module, mq.Qwen3_5RMSNorm):
                # Qwen3_5RMSNorm scales by (1 + weight): small values around 0.
                value = normal(shape, 0.1)
            elif isinstance(module, nn.LayerNorm):
                value = normal(shape, 0.1, 1.0) if pname == "weight" else normal(shape, 0.02)
            elif pname == "A_log":
                # Per-head decay rate A in [1, 16], stored as log(A) like the real model.
                value = torch.empty(shape, device=device).uniform_(1.0, 16.0, generator=gen).log()
            elif pname == "dt_bias":
                value = normal(shape, 0.5)
            elif pname == "bias":
                value = normal(shape, 0.02)
            elif isinstance(module, nn.Conv1d):
                # Depthwise causal conv over `kernel` time steps: fan_in = kernel.
                value = normal(shape, shape[-1] ** -0.5)
            elif module_name == "lm_head":
                value = normal(shape, LOGIT_SCALE * shape[1] ** -0.5)
                # A trained model never emits vision placeholders or the padding rows past the
                # tokenizer; a random one would, and feeding such a token back (next turn,
                # re-prefill) breaks the image-token/feature bookkeeping or decoding.  Near-zero
                # rows keep their logits ~0, far below the winning ~10+.
                value[_never_generated_ids(shape[0])] *= 1e-3
            elif isinstance(module, nn.Embedding):
                # Token embeddings and vision position embeddings: unit-scale vectors, the same
                # magnitude as the layer outputs that get added to them.
                value = normal(shape, 1.0)
            else:
                # Linear / Conv3d weights: fan_in = everything but the output dimension.
                value = normal(shape, math.prod(shape[1:]) ** -0.5)
            with torch.no_grad():
                param.copy_(value)


def _build_model(preset: str, seed: int, mtp: bool = True, device: str | None = None,
                 dtype: torch.dtype = torch.float32):
    """A ``Qwen3_5ForConditionalGeneration`` of the preset with deterministic random fp32 weights, and
    (mtp) the checkpoint's multi-token-prediction head as ``mtp.*`` with the real names and shapes.
    transformers has no module for it (and ignores its keys when loading); save_pretrained writes it.

    device: build and fill the weights there, in `dtype`, then bring them to the CPU. The default (fp32 on
    the CPU, cast afterwards) is what the tests use; a 27B-shaped benchmark checkpoint takes it on a GPU:
    the CPU path would hold 108 GB of fp32 and fill it at ~60 MB/s (8 of 64 layers took 158 s on a GPU
    machine's 16 cores). The values differ from the CPU path's (another generator), the format does not."""
    from transformers import Qwen3_5ForConditionalGeneration

    from .mtp import Qwen3_5MTP

    config = make_config(preset, mtp)
    # Constructing under the seed makes any state we do not overwrite (there should be none
    # among the parameters) deterministic as well.
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    if device is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            model = Qwen3_5ForConditionalGeneration(config)
            if mtp:  # registered last, so it is randomised last: the main weights do not depend on it
                model.mtp = Qwen3_5MTP(config.text_config)
    finally:
        torch.set_default_dtype(default)
    _randomize_(model, seed, device or "cpu")
    return model.to("cpu").eval()


# ---------------------------------------------------------------------------------------------
# Checkpoint directory
# ---------------------------------------------------------------------------------------------


def _marker(preset: str, seed: int, dtype: torch.dtype, mtp: bool = True) -> dict:
    return {
        "mtp": mtp,
        "builder": "ds_qwen_vision.checkpoint",
        "builder_version": BUILDER_VERSION,
        "preset": preset,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer_files(directory: Path) -> None:
    """tokenizer.json (+ the vocab.json / merges.txt the real repos also ship), tokenizer
    config and chat template."""
    tokenizer_json = _tokenizer_json()
    (directory / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    model = json.loads(tokenizer_json)["model"]
    _write_json(directory / "vocab.json", model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    _write_json(directory / "tokenizer_config.json", _tokenizer_config())
    # transformers 5 reads (and writes) the template from chat_template.jinja, for both the
    # tokenizer and the processor, like the real Qwen3.5 repos.
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def _write_checkpoint(directory: Path, preset: str, seed: int, dtype: torch.dtype, mtp: bool = True,
                      device: str | None = None) -> None:
    from transformers import GenerationConfig

    ids = token_ids()
    model = _build_model(preset, seed, mtp, device, dtype).to(dtype)
    # Qwen3.6's generation_config.json: stop on <|im_end|> or <|endoftext|>, pad with
    # <|endoftext|>, sample with temperature 0.6, top_p 0.95, top_k 20 -- the defaults the
    # server applies to requests that leave them out (tests that need determinism ask for
    # temperature 0, or pass do_sample=False to transformers' generate).
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=True, temperature=0.6, top_p=0.95, top_k=20,
    )
    # Writes config.json, generation_config.json, model-0000i-of-0000n.safetensors and
    # model.safetensors.index.json with the official key names.
    model.save_pretrained(directory, max_shard_size=PRESETS[preset]["max_shard_size"])
    _write_tokenizer_files(directory)
    _write_json(directory / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(directory / "video_preprocessor_config.json", VIDEO_PREPROCESSOR_CONFIG)


def build_checkpoint(out_dir, preset: str = "tiny", seed: int = 0, dtype=torch.float32, mtp: bool = True,
                     device: str | None = None) -> Path:
    """Build (or reuse) a random Qwen3.5/3.6-VL checkpoint in ``out_dir`` and return its path.

    ``out_dir`` doubles as a cache: if it already holds a finished build with the same
    preset, seed, dtype and builder version it is returned as is.  The checkpoint is written
    into a temporary sibling directory which is renamed into place only when complete, so an
    interrupted build never leaves a half-written cache behind, and concurrent builders
    (e.g. parallel test workers) simply keep whichever finished first.
    """
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    out_dir = Path(out_dir).absolute()
    wanted = _marker(preset, seed, dtype, mtp)
    if device is not None:  # other values than the CPU build's: not the same cache entry
        wanted["built_on"] = device
    if _read_marker(out_dir) == wanted:
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and _read_marker(out_dir) is None:
        # Never delete something we did not create.
        raise FileExistsError(f"{out_dir} exists, is not empty and is not a checkpoint built by this module")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_checkpoint(tmp, preset, seed, dtype, mtp, device)
        # mkdtemp (and transformers' shard writer) create owner-only entries; a model directory
        # should be readable like any other download.
        tmp.chmod(0o755)
        for entry in tmp.iterdir():
            entry.chmod(0o644)
        # Written last: its presence certifies that everything before it is complete.
        _write_json(tmp / MARKER_FILE, wanted)
        for _ in range(2):
            if _read_marker(out_dir) == wanted:
                return out_dir  # a concurrent builder finished first
            if out_dir.exists():
                # An older build (other preset/seed/version) or an empty directory.
                shutil.rmtree(out_dir, ignore_errors=True)
            try:
                os.rename(tmp, out_dir)
                return out_dir
            except OSError:
                continue  # someone re-created out_dir in between; look again
        raise RuntimeError(f"could not move the finished checkpoint into {out_dir}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)



def fp8_not_converted(config) -> list[str]:
    """modules_to_not_convert named in full, as Qwen's FP8 config.json does: the vision tower, lm_head,
    embed_tokens, every norm, the GDN layers' conv1d / in_proj_a / in_proj_b (and A_log, dt_bias), the attention
    q_norm / k_norm, mtp.fc and the MTP norms."""
    text = config.text_config if hasattr(config, "text_config") else config
    names = ["model.visual", "lm_head", "model.language_model.embed_tokens", "model.language_model.norm"]
    layers = [(f"model.language_model.layers.{i}", kind) for i, kind in enumerate(text.layer_types)]
    layers += [(f"mtp.layers.{i}", "full_attention") for i in range(getattr(text, "mtp_num_hidden_layers", 0) or 0)]
    for prefix, kind in layers:
        names += [f"{prefix}.input_layernorm", f"{prefix}.post_attention_layernorm"]
        if kind == "linear_attention":
            names += [f"{prefix}.linear_attn.{m}" for m in ("A_log", "conv1d", "dt_bias", "in_proj_a", "in_proj_b",
                                                              "norm")]
        else:
            names += [f"{prefix}.self_attn.q_norm", f"{prefix}.self_attn.k_norm"]
    if getattr(text, "mtp_num_hidden_layers", 0):
        names += ["mtp.fc", "mtp.norm", "mtp.pre_fc_norm_embedding", "mtp.pre_fc_norm_hidden"]
    return names


def quantize_fp8_checkpoint(src, out_dir, block: tuple[int, int] = (128, 128),
                            not_convert: list[str] | None = None, device: str | None = None,
                            consume: bool = False) -> Path:
    """A copy of checkpoint `src` in Qwen's block-wise FP8 format (ds_qwen_vision/fp8.py): every language-model
    linear weight outside `not_convert` (default: fp8_not_converted) as float8 e4m3 with a float32 scale per
    block of `block` (its largest magnitude / 448, Qwen's and DeepSeek's recipe), `quantization_config` in
    config.json. Everything else as it is in `src`. `device`: where the blocks are quantized (a GPU: seconds for
    the 27B). `consume`: each of `src`'s shards is deleted once its copy is written, for a disk that cannot hold
    both (the 27B's 54 GB and 28 GB on a 64 GB disk); `src` stops being a checkpoint first (its build marker goes).
    The copy's own marker names its source, so a finished copy is reused."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig
    from transformers.quantizers.quantizers_utils import should_convert_module

    src, out_dir = Path(src), Path(out_dir)
    wanted = {"fp8_of": _read_marker(src), "block": list(block), "not_convert": not_convert}
    if _read_marker(out_dir) == wanted and wanted["fp8_of"] is not None:
        return out_dir
    config = AutoConfig.from_pretrained(src)
    not_convert = fp8_not_converted(config) if not_convert is None else not_convert
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", MARKER_FILE):
            shutil.copy(f, out_dir / f.name)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    if consume:
        (src / MARKER_FILE).unlink(missing_ok=True)
    weight_map = {}
    for name in sorted(set(index["weight_map"].values())):
        tensors = load_file(src / name)
        out = {}
        for key, t in tensors.items():
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and t.dim() == 2 and key.startswith(("model.language_model.", "mtp.")) \
                    and should_convert_module(module, not_convert):
                q, scale = quantize_blockwise(t.to(device) if device else t, block)
                out[key], out[module + ".weight_scale_inv"] = q.cpu(), scale.cpu()
            else:
                out[key] = t
        save_file(out, out_dir / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in out})
        del tensors, out
        if consume:
            (src / name).unlink()
    _write_json(out_dir / "model.safetensors.index.json", {"metadata": index.get("metadata", {}), "weight_map": weight_map})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block), "modules_to_not_convert": not_convert}
    _write_json(out_dir / "config.json", cfg)
    _write_json(out_dir / MARKER_FILE, wanted)
    return out_dir


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (e4m3 [out, in], float32 scale_inv [ceil(out/b0), ceil(in/b1)]), w ~= q x scale_inv per block
    (a last partial block along either dimension has a scale of its own)."""
    rows, cols = w.shape
    r, c = -(-rows // block[0]), -(-cols // block[1])
    padded = torch.zeros(r * block[0], c * block[1], dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w.float()
    tiles = padded.view(r, block[0], c, block[1])
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)  # [r, c]
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(r * block[0], c * block[1])
    return q[:rows, :cols].contiguous(), scale


def demo_dir() -> Path:
    """Where launch.sh builds (once) and serves the embedded demo checkpoint (the front reads its
    preprocessor_config.json there too: config.demo_checkpoint_dir)."""
    from ds_qwen_vision.config import demo_checkpoint_dir

    return Path(demo_checkpoint_dir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ds_qwen_vision.checkpoint",
        description="Build a tiny random Qwen3.5/3.6 vision-language checkpoint (Hugging Face format).",
    )
    parser.add_argument("--out", help="output directory (reused if it already holds this build)")
    parser.add_argument("--demo-dir", action="store_true", help="print the embedded demo's cache directory and exit")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--no-mtp", action="store_true", help="without the mtp.* head (as a checkpoint that has none)")
    args = parser.parse_args(argv)
    if args.demo_dir:
        print(demo_dir())
        return 0
    if not args.out:
        parser.error("--out is required")
    path = build_checkpoint(args.out, preset=args.preset, seed=args.seed, dtype=_DTYPES[args.dtype], mtp=not args.no_mtp)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
