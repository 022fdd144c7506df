"""Rank 0's engine: owns the request queue, decides every step, samples, and turns tokens into events.

Requests arrive from the IPC threads (`Engine.generate`), are checked against the model (chat
template, image processor, token limits) before they are queued, and are then run by the main loop
(`Engine.run`), which broadcasts a StepPlan per step so every rank runs the same forward. Nothing about
a request reaches the other ranks until it has passed every check.
"""
from __future__ import annotations

import base64
import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from transformers.image_processing_backends import TorchvisionBackend

from ..model import log, open_image
from ..plan import Prefill, StepPlan
from .prefix_cache import PrefixCache, PromptKeys
from .sampling import Sampling, sample
from .textstream import TextStream, prompt_opens_thinking

HEARTBEAT_S = 1.0


class RequestError(Exception):
    """A request the engine refuses; becomes an OpenAI error event (status, type, message, param, code)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def event(self) -> dict:
        return {"event": "error", "status": self.status, "type": self.type, "message": self.message,
                "param": self.param, "code": self.code}


@dataclass
class Sequence:
    id: int
    input_ids: list[int]
    pixel_values: torch.Tensor | None   # the processor's output, handed to the runner (rank 0) at prefill
    image_grid_thw: list[list[int]]
    sampling: Sampling
    stream: TextStream
    events: queue.Queue
    generator: torch.Generator | None
    created: float = field(default_factory=time.perf_counter)
    slot: int | None = None
    prefilled: int = 0              # prompt tokens scheduled so far (chunked prefill)
    next_token: int | None = None   # sampled, fed to the model in the next step
    generated: int = 0
    first_token_at: float | None = None
    cancelled: bool = False
    done: bool = False
    prefix: PromptKeys | None = None  # prefix reuse + image cache (prefix_cache.py); None: caches off


class Engine:
    def __init__(self, runner, channel, processor, limits, cache=None):
        self.runner, self.channel, self.processor, self.limits = runner, channel, processor, limits
        self.tokenizer = processor.tokenizer
        self.max_slots = runner.max_slots  # sequences generated together; new ones join at step boundaries
        self.eos_ids = self._eos_ids(runner.model)
        # transformers' torchvision image processor resizes and normalises on the GPU when asked: the same
        # pixels (max difference 0.0 on a 1024x1024 image) in 37 ms instead of 96 ms on the host (H200 box).
        device = getattr(runner, "device", None)
        self.image_device = {"device": device} if getattr(device, "type", None) == "cuda" and \
            isinstance(processor.image_processor, TorchvisionBackend) and self._processes_on(device) else {}
        # A sequence must fit its slot's cache, and the model's positions.
        self.context_len = min(runner.max_len, runner.model.config.text_config.max_position_embeddings)
        self.waiting: queue.Queue[Sequence] = queue.Queue(maxsize=limits.max_queue)
        self.running: dict[int, Sequence] = {}
        self.ids = itertools.count()
        self.ranks: list[dict] = []
        self.alive = True
        self.failure: str | None = None
        self.stopping = threading.Event()
        self.drain_deadline = math.inf  # after stop(): monotonic time by which in-flight work must be over
        self.busy_since: float | None = None  # monotonic start of the collective in progress (the watchdog's view)
        self.wake = threading.Event()
        self.registry = CollectorRegistry()
        r = self.registry
        self.m_requests = Counter("dsqv_engine_requests", "Requests finished by the engine, by outcome",
                                  ["outcome"], registry=r)
        self.m_ttft = Histogram("dsqv_time_to_first_token_seconds", "Queueing + prefill until the first token",
                                registry=r, buckets=(.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.m_tokens = Counter("dsqv_generated_tokens", "Tokens generated", registry=r)
        self.m_tps = Gauge("dsqv_tokens_per_second", "Generated tokens per second over the last step", registry=r)
        self.m_queue = Gauge("dsqv_queue_depth", "Requests waiting for a slot", registry=r)
        self.m_inflight = Gauge("dsqv_in_flight", "Requests being generated", registry=r)
        self.m_step = Histogram("dsqv_step_seconds", "Wall time of one engine step", registry=r,
                                buckets=(.005, .01, .02, .05, .1, .25, .5, 1, 2.5, 10))
        # `cache`: the deployment config's cache section (budgets); None: no prefix reuse, no image cache
        self.prefix_cache = PrefixCache.for_runner(runner, cache, self.tokenizer, r)

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

    @staticmethod
    def _eos_ids(model) -> set[int]:
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        return {int(e) for e in eos}

    # ---- request intake (IPC threads) -------------------------------------------------------------
    def prepare(self, request: dict) -> Sequence:
        """Everything that can refuse a request, done before it is queued. Raises RequestError."""
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
            messages.append({"role": message["role"], "content": content})
        if len(images) > self.limits.max_images_per_request:
            raise RequestError(400, f"at most {self.limits.max_images_per_request} images per request", "messages")
        try:
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                        **request.get("chat_template_kwargs", {}))
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
        input_ids = inputs["input_ids"][0].tolist()
        n_prompt = len(input_ids)
        limit = min(self.limits.max_prompt_tokens, self.context_len - 1)
        if n_prompt > limit:
            raise RequestError(400, f"the prompt is {n_prompt} tokens (images included); the limit is {limit}",
                               "messages", "context_length_exceeded")
        room = self.context_len - n_prompt
        max_tokens = request.get("max_tokens") or min(self.limits.max_new_tokens, room)
        if max_tokens > self.limits.max_new_tokens:
            raise RequestError(400, f"max_tokens is {max_tokens}; the limit is {self.limits.max_new_tokens}",
                               "max_tokens")
        max_tokens = min(max_tokens, room)
        sampling = Sampling(max_tokens=max_tokens, temperature=request.get("temperature", 1.0),
                            top_p=request.get("top_p", 1.0), top_k=request.get("top_k", -1),
                            seed=request.get("seed"), stop=list(request.get("stop") or []))
        generator = None
        if sampling.temperature > 0:  # on the logits' device: sampling stays there (engine.sample)
            generator = torch.Generator(device=getattr(self.runner, "device", "cpu"))
            generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        stream = TextStream(self.tokenizer, sampling.stop, prompt_opens_thinking(prompt))
        pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        if pixels is not None:  # held on the host until the prefill: queued requests take no device memory
            pixels = pixels.cpu()
        grid = grid.tolist() if grid is not None else []
        return Sequence(next(self.ids), input_ids, pixels, grid, sampling, stream, queue.Queue(), generator,
                        prefix=inputs.get("prefix"))

    def generate(self, request: dict):
        """IPC handler: yields the events of one request. Closing the generator cancels the request."""
        if not self.alive:
            yield RequestError(503, f"the engine is down: {self.failure}", type="service_unavailable_error",
                               code="engine_down").event()
            return
        if self.stopping.is_set():
            yield RequestError(503, "the server is shutting down; retry on another replica or after a restart",
                               type="service_unavailable_error", code="shutting_down").event()
            return
        try:
            seq = self.prepare(request)
        except RequestError as e:
            self.m_requests.labels("rejected").inc()
            yield e.event()
            return
        try:
            self.waiting.put_nowait(seq)
        except queue.Full:
            self.m_requests.labels("queue_full").inc()
            yield RequestError(429, "the request queue is full; retry later", type="rate_limit_error",
                               code="queue_full").event()
            return
        self.m_queue.set(self.waiting.qsize())
        self.wake.set()
        if not self.alive:  # failed between the check above and the put: fail() may have drained already
            self.fail(self.failure)
        yield {"event": "start", "prompt_tokens": len(seq.input_ids)}
        try:
            while True:
                try:
                    event = seq.events.get(timeout=0.25)
                except queue.Empty:
                    yield None  # idle tick: the IPC server checks whether the client is still there
                    continue
                yield event
                if event["event"] in ("done", "error"):
                    return
        finally:
            if not seq.done:
                seq.cancelled = True  # the client went away: the loop frees its slot at the next step
                self.wake.set()

    def health(self) -> dict:
        ready = (self.alive and not self.stopping.is_set() and len(self.ranks) == self.channel.world
                 and all(r.get("ready") for r in self.ranks))
        return {"ready": ready, "alive": self.alive, "stopping": self.stopping.is_set(), "failure": self.failure,
                "ranks": self.ranks, "queue_depth": self.waiting.qsize(), "in_flight": len(self.running)}

    def metrics(self) -> str:
        return generate_latest(self.registry).decode()

    # ---- the loop (main thread of rank 0) ---------------------------------------------------------
    def run(self) -> None:
        """Plan and run steps until stop() and its drain are over; on any failure fail every request and re-raise.

        After stop() the requests in flight or queued keep running until they are all done or the drain
        deadline passes; those left then get a 503. Every collective sets `busy_since` while it runs, for the
        watchdog (serve.py): a rank that died leaves the others spinning in the all-reduce, never raising.
        """
        last_beat = 0.0
        try:
            while not (self.stopping.is_set() and (self.idle() or time.monotonic() >= self.drain_deadline)):
                plan = self.plan()
                if plan.empty():
                    if time.monotonic() - last_beat >= HEARTBEAT_S:
                        self.busy_since = time.monotonic()
                        self.heartbeat()
                        self.busy_since = None
                        last_beat = time.monotonic()
                    self.wake.wait(0.05)
                    self.wake.clear()
                    continue
                t0 = time.perf_counter()
                self.busy_since = time.monotonic()
                self.channel.broadcast(plan)
                pixels = {p.slot: self.running[p.slot].pixel_values for p in plan.prefill if p.pixels_shape}
                logits = self.runner.run(plan, pixels)
                self.after_step(plan, logits)
                self.busy_since = None
                dt = time.perf_counter() - t0
                self.m_step.observe(dt)
                stepped = len(plan.prefill) + len(plan.decode)
                if stepped:
                    self.m_tps.set(stepped / dt)
        except BaseException as e:
            self.fail(f"{type(e).__name__}: {e}")
            raise
        self.fail("the server shut down before this request finished (server.shutdown_grace_s)", "shutting_down")
        self.busy_since = time.monotonic()
        self.channel.broadcast(StepPlan(stop=True))
        self.busy_since = None

    def idle(self) -> bool:
        """Nothing queued, nothing left to generate."""
        return self.waiting.empty() and all(seq.done or seq.cancelled for seq in self.running.values())

    def heartbeat(self) -> None:
        self.channel.broadcast(StepPlan(heartbeat=True))
        self.ranks = self.channel.gather(self.runner.status())

    def plan(self) -> StepPlan:
        """Every generating sequence decodes one token; prompts are prefilled within a token budget per
        step (limits.prefill_chunk_tokens), continuing ones first, then new sequences in free slots."""
        plan = StepPlan()
        self.prefix_cache.begin_plan(plan)
        budget = self.limits.prefill_chunk_tokens
        for slot, seq in list(self.running.items()):
            if seq.cancelled or seq.done:
                if seq.cancelled and not seq.done:
                    self.m_requests.labels("cancelled").inc()
                del self.running[slot]  # the slot's next prefill overwrites its state
                budget -= self.prefix_cache.finished(plan, seq)  # a snapshot job in the slot it left, if deferred
            elif seq.prefilled < len(seq.input_ids):
                budget -= self.schedule_prefill(plan, seq, budget)
            elif seq.next_token is not None:
                plan.decode.append((slot, seq.next_token))
        free = [s for s in range(self.max_slots) if s not in self.running]
        while free and budget > 0:
            try:
                seq = self.waiting.get_nowait()
            except queue.Empty:
                break
            if seq.cancelled:
                self.m_requests.labels("cancelled").inc()
                continue
            seq.slot = free.pop(0)  # the lowest free slot: decoding rows stay packed at the front
            self.running[seq.slot] = seq
            seq.prefilled = self.prefix_cache.reuse(seq.prefix)  # a held prefix: its state is restored
            budget -= self.schedule_prefill(plan, seq, budget)
        self.m_queue.set(self.waiting.qsize())
        self.m_inflight.set(len(self.running))
        return plan

    def schedule_prefill(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        """The next chunk of seq's prompt (at most `budget` tokens) into the plan; returns its length."""
        start = seq.prefilled
        end = min(len(seq.input_ids), start + budget)
        if end <= start:
            return 0
        begins = start == (seq.prefix.cached if seq.prefix else 0)  # the sequence's first chunk
        first = begins and seq.pixel_values is not None
        item = Prefill(seq.slot, seq.input_ids, seq.image_grid_thw if begins else [],
                       tuple(seq.pixel_values.shape) if first else None, start, end)
        # prefix reuse / image cache: restore, snapshot (the chunk split there), only uncached images' pixels
        items, pixels = self.prefix_cache.schedule(seq.prefix, item, seq.pixel_values if first else None)
        if begins:
            seq.pixel_values = pixels
        plan.prefill.extend(items)
        seq.prefilled = end
        return end - start

    def after_step(self, plan: StepPlan, logits: dict[int, torch.Tensor]) -> None:
        now = time.perf_counter()
        if not logits:
            return
        # Every row's token is picked where the logits are (greedy: one argmax for all rows; sampled: each
        # with its request's generator), then one copy to the host: one sync per step, not per row.
        rows = torch.stack(list(logits.values()))
        picks = rows.argmax(-1)
        for i, slot in enumerate(logits):
            seq = self.running[slot]
            if seq.sampling.temperature > 0 and seq.generator is not None:
                picks[i] = sample(rows[i], seq.sampling, seq.generator)
        for slot, token in zip(logits, picks.tolist()):
            seq = self.running[slot]
            seq.pixel_values = None  # prefilled: the pixels are no longer needed
            seq.generated += 1
            self.m_tokens.inc()
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.m_ttft.observe(now - seq.created)
            finish = None
            if token in self.eos_ids:
                finish = "stop"
            else:
                reasoning, content = seq.stream.add(token)
                self.emit(seq, reasoning, content)
                if seq.stream.stopped:
                    finish = "stop"
                elif seq.generated >= seq.sampling.max_tokens:
                    finish = "length"
            if finish:
                self.emit(seq, *seq.stream.finish())
                self.finish(seq, finish)
            else:
                seq.next_token = token

    @staticmethod
    def emit(seq: Sequence, reasoning: str, content: str) -> None:
        if reasoning or content:
            seq.events.put({"event": "delta", "content": content, "reasoning_content": reasoning})

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.done = True
        n_prompt = len(seq.input_ids)
        seq.events.put({"event": "done", "finish_reason": reason,
                        "usage": {"prompt_tokens": n_prompt, "completion_tokens": seq.generated,
                                  "total_tokens": n_prompt + seq.generated,
                                  "prompt_tokens_details": {"cached_tokens": seq.prefix.cached if seq.prefix else 0}}})
        self.m_requests.labels("completed").inc()

    def fail(self, why: str, code: str = "engine_down") -> None:
        """Every request in flight or queued gets a 503; the engine refuses new ones from now on.

        Also called from the watchdog thread while the main thread is stuck in a step."""
        self.alive, self.failure = False, why
        error = RequestError(503, f"the engine stopped: {why}", type="service_unavailable_error", code=code).event()
        failed = [seq for seq in list(self.running.values()) if not (seq.done or seq.cancelled)]
        while True:
            try:
                failed.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        for seq in failed:
            seq.done = True
            seq.events.put(error)
            self.m_requests.labels("failed").inc()

    def stop(self, grace_s: float = 0.0) -> None:
        """Refuse new requests (503) and end run() once the work in flight is done, or after ``grace_s``.

        Safe from a signal handler; a second call can only bring the deadline closer."""
        self.drain_deadline = min(self.drain_deadline, time.monotonic() + grace_s)
        self.stopping.set()
        self.wake.set()
