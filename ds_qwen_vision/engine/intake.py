"""Request intake (the IPC threads): a request, as server/protocol.py validated it, into sequences.

What the front cannot know is checked here, before anything is queued, so that nothing about a request
reaches the other ranks until it passed: the chat template, the images (through the processor, capped by
the memory planner's limits.max_image_pixels), the prompt's length against the limits and the KV cache,
stop_token_ids against the vocabulary, and the grammar of response_format / forced tool calls. What the
front checked (images per request, max_tokens against limits.max_new_tokens, value ranges) is not checked
again.
"""
from __future__ import annotations

import base64
import copy
import itertools
import queue

import torch
from transformers.image_processing_backends import TorchvisionBackend

from ..model import log, open_image
from . import faults
from .grammar import GrammarError, Grammars
from .sampling import Sampling, generation_defaults
from .sequence import RequestError, Sequence
from .textstream import TextStream, prompt_opens_thinking
from .tools import ToolCallParser


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return {int(e) for e in eos}


class Intake:
    def __init__(self, runner, processor, limits, scheduler, prefix_cache, generation_config_defaults: bool = True):
        self.runner, self.processor, self.limits = runner, processor, limits
        self.scheduler, self.prefix_cache = scheduler, prefix_cache
        self.tokenizer = processor.tokenizer
        self.eos_ids = eos_ids(runner.model)
        # What a request leaves out comes from the checkpoint's generation_config (config key
        # sampling.generation_config_defaults), as vLLM does.
        self.sampling_defaults = generation_defaults(runner.model.generation_config) \
            if generation_config_defaults else {}
        self.vocab_size = getattr(runner.model.config.text_config, "vocab_size", None)
        # (a runner that does not say its vocabulary size -- a test's fake -- gets the tokenizer's)
        self.grammars = Grammars(self.tokenizer, self.vocab_size or len(self.tokenizer), self.eos_ids)
        # A sequence must fit its slot's cache, and the model's positions.
        self.context_len = min(runner.max_len, runner.model.config.text_config.max_position_embeddings)
        # transformers' torchvision image processor resizes and normalises on the GPU when asked: the same
        # pixels (max difference 0.0 on a 1024x1024 image) in 37 ms instead of 96 ms on the host (H200 box).
        device = getattr(runner, "device", None)
        self.image_device = {"device": device} if getattr(device, "type", None) == "cuda" and \
            isinstance(processor.image_processor, TorchvisionBackend) and self._processes_on(device) else {}
        self.ids = itertools.count()
        self.faults = faults.enabled()  # read once: a test's switch, inert in production

    def _processes_on(self, device) -> bool:
        """Whether the processor takes images on `device` (probed once, so that a failure there can
        never turn good images into 400s: the host path is used instead)."""
        from PIL import Image

        try:
            self.processor(text=[self.processor.image_token], images=[Image.new("RGB", (64, 64))],
                           return_tensors="pt", device=device)
            return True
        except Exception as e:
            log(f"[rank 0] image processor on {device} failed ({e!r}); images are processed on the host")
            return False

    def prompt_limit(self) -> int:
        return min(self.limits.max_prompt_tokens or self.context_len, self.context_len - 1)

    def prepare(self, request: dict) -> Sequence:
        """The request's sequences (n choices, one event queue); returns the first. Raises RequestError."""
        images: list[bytes] = []
        messages = []
        for message in request["messages"]:
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part["type"] == "image":
                        images.append(base64.b64decode(part["data_b64"]))
                        parts.append({"type": "image"})
                    else:
                        parts.append({"type": "text", "text": part["text"]})
                content = parts
            messages.append({**message, "content": content})  # tool_calls, tool_call_id as the template reads them
        # tool_choice "none": the model is not told about the tools, so it answers in text.
        tools = request.get("tools") if request.get("tool_choice") != "none" else None
        try:
            prompt = self.processor.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                                        tokenize=False, **request.get("chat_template_kwargs", {}))
        except Exception as e:  # the template raises for conversations it cannot render (e.g. role order)
            raise RequestError(400, f"the chat template refused these messages: {e}", "messages") from None
        try:
            if self.prefix_cache.enabled:  # images the ranks hold embeddings of are not processed again
                inputs = self.prefix_cache.process(self.processor, prompt, images, self.image_device)
            else:
                pil = [open_image(b) for b in images]
                inputs = self.processor(text=[prompt], images=pil or None, return_tensors="pt", **self.image_device)
        except Exception as e:
            raise RequestError(400, f"the image processor could not read an image: {e}", "messages",
                               "invalid_image") from None
        grid = inputs.get("image_grid_thw")
        patch = self.runner.model.config.vision_config.patch_size if grid is not None else 0
        for t, h, w in (grid.tolist() if grid is not None else []):
            # the memory planner may have capped limits.max_image_pixels below what the front lets through
            if t * h * w * patch * patch > self.limits.max_image_pixels:
                raise RequestError(400, f"an image of {w * patch}x{h * patch} pixels (as processed) is over this "
                                   f"deployment's limits.max_image_pixels ({self.limits.max_image_pixels:,}; the memory "
                                   f"planner's cap, see the start-up log)", "messages", "image_too_large")
        input_ids = inputs["input_ids"][0].tolist()
        n_prompt = len(input_ids)
        limit = self.prompt_limit()
        if n_prompt > limit:
            raise RequestError(400, f"the prompt is {n_prompt} tokens (images included); the limit is {limit}",
                               "messages", "context_length_exceeded")
        room = self.context_len - n_prompt
        blocks, slack = self.scheduler.blocks, self.scheduler.kv_slack
        if blocks is not None:  # and the KV cache: a sequence reserves its blocks at admission
            room = min(room, blocks.capacity * blocks.block_size - slack - n_prompt)
            if room < 1:
                raise RequestError(400, f"the prompt is {n_prompt} tokens (images included); the KV cache holds "
                                   f"{blocks.capacity * blocks.block_size - slack - 1} "
                                   f"tokens of prompt at most", "messages", "context_length_exceeded")
        max_tokens = request.get("max_tokens") or min(self.limits.max_new_tokens, room)
        if request.get("max_tokens") and blocks is not None and max_tokens > room:
            raise RequestError(400, f"the prompt ({n_prompt} tokens) and max_tokens ({max_tokens}) do not fit the "
                               f"KV cache: at most {room} tokens can follow this prompt", "max_tokens",
                               "context_length_exceeded")
        max_tokens = min(max_tokens, room)
        sampling = Sampling.from_request(request, self.sampling_defaults, max_tokens)
        if self.vocab_size is not None and any(t >= self.vocab_size for t in sampling.stop_token_ids):
            raise RequestError(400, f"stop_token_ids holds an id past the vocabulary ({self.vocab_size} tokens)",
                               "stop_token_ids", "invalid_value")
        thinking = prompt_opens_thinking(prompt)
        try:
            compiled = self.grammars.compile(request, thinking)
        except GrammarError as e:
            raise RequestError(400, str(e), e.param, "invalid_schema") from None
        pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        if pixels is not None:  # held on the host until the prefill: queued requests take no device memory
            pixels = pixels.cpu()
        fault = faults.stage_of(request) if self.faults else None
        # n choices: n sequences with one event queue; choice i draws with seed + i (its own generator).
        events: queue.Queue = queue.Queue()
        group: list[Sequence] = []
        for index in range(request.get("n") or 1):
            generator = None
            if not sampling.greedy:  # on the logits' device: sampling stays there (engine.sample)
                generator = torch.Generator(device=getattr(self.runner, "device", "cpu"))
                generator.manual_seed(sampling.seed + index if sampling.seed is not None else torch.seed())
            group.append(Sequence(
                next(self.ids), input_ids, sampling, pixels, grid.tolist() if grid is not None else [],
                TextStream(self.tokenizer, sampling.stop, thinking), events, generator,
                request_id=request.get("request_id") or "", index=index, group=group,
                pixels=pixels.shape[0] * patch * patch if pixels is not None else 0,
                prefix=copy.copy(inputs.get("prefix")),  # each its own reuse state
                grammar=self.grammars.matcher(compiled), fault=fault,
                tools=ToolCallParser(tools, request.get("parallel_tool_calls", True)) if tools else None,
                reserve=n_prompt + max_tokens + slack))
        return group[0]
