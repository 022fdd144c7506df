"""How many prompt tokens an image becomes, from its width and height alone (read from its header).

The checkpoint's image processor resizes every image to multiples of ``patch_size x merge_size`` pixels
within ``[min_pixels, max_pixels]`` (transformers' Qwen2-VL ``smart_resize``, which Qwen3.5/3.6 use) and
the chat template writes each image as ``<|vision_start|>``, one ``<|image_pad|>`` per merged patch,
``<|vision_end|>``.  The front counts that before any pixel is decoded, so that a prompt whose images
alone are over the prompt-token limit is refused without decoding them.

Written out here rather than imported: the front holds no transformers (and no torch).  transformers'
``Qwen2VLImageProcessor.get_number_of_image_patches`` is the same rule (vLLM counts image tokens with
it); tests/test_protocol.py checks this one against it and against the processor's own output.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The processor refuses images more elongated than this (smart_resize raises).
MAX_ASPECT_RATIO = 200
# <|vision_start|> and <|vision_end|> around each image's pad tokens
MARKER_TOKENS = 2


@dataclass(frozen=True)
class ImageTokens:
    """The resize rule of one checkpoint's image processor (its preprocessor_config.json)."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> ImageTokens | None:
        """The rule from ``model_dir/preprocessor_config.json``; None (and a warning) where it cannot be read:
        the engine still counts every prompt after processing it."""
        path = Path(model_dir) / "preprocessor_config.json"
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
            size = cfg.get("size") or {}
            # Older configs name the bounds min_pixels / max_pixels; they win over size, as in transformers.
            rule = cls(patch_size=int(cfg["patch_size"]), merge_size=int(cfg["merge_size"]),
                       min_pixels=int(cfg.get("min_pixels") or size["shortest_edge"]),
                       max_pixels=int(cfg.get("max_pixels") or size["longest_edge"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("image token counts before decoding are off: cannot read the resize rule from %s (%r)", path, e)
            return None
        return rule

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) as the processor resizes the image (transformers' smart_resize)."""
        factor = self.patch_size * self.merge_size
        h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return w_bar, h_bar

    def tokens(self, width: int, height: int) -> int:
        """Prompt tokens of one image: a pad token per merged patch, and its two markers."""
        w, h = self.resized(width, height)
        factor = self.patch_size * self.merge_size
        return (w // factor) * (h // factor) + MARKER_TOKENS
