"""Rank 0's engine: owns the request queue, decides every step, samples, and turns tokens into events.

Requests arrive from the IPC threads (`Engine.generate`), are checked against the model (chat
template, image processor, token limits) before they are queued, and are then run by the main loop
(`Engine.run`), which broadcasts a StepPlan per step so every rank runs the same forward. Nothing about
a request reaches the other ranks until it has passed every check.

The loop keeps one step in flight: it plans, broadcasts and launches step N+1, then reads step N's
tokens (already picked on the device, and already fed to step N+1 there) and does the host work --
detokenization, stop strings, logprob entries, events -- while the GPU runs N+1. A sequence that ends
at step N (end of sequence, a stop string or token) is therefore computed once more in step N+1; that
token is dropped, never emitted. max_tokens is counted when steps are scheduled, so it costs no extra
step. A step whose picks need the host's view of the tokens so far (`synchronous`) waits for them
first; with speculative decoding (engine/speculative.py) every step runs synchronously, as before.
"""
from __future__ import annotations

import base64
import copy
import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from transformers.image_processing_backends import TorchvisionBackend

from ..model import log, open_image, to_device
from ..plan import FROM_DEVICE, Prefill, StepPlan
from .block_manager import BlockPool
from .grammar import GrammarError, Grammars
from .logprobs import TokenBytes
from .prefix_cache import PrefixCache, PromptKeys
from .sampling import PenaltyState, Picked, RowParams, Sampling, generation_defaults, sample
from .speculative import Speculator
from .textstream import TextStream, prompt_opens_thinking
from .tools import ToolCallParser
from .trace import StepTrace

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
    next_token: int | None = None   # sampled, fed to the model in the next step (synchronous steps)
    in_flight: int = 0              # tokens scheduled whose value the host has not read yet
    picked: int = 0                 # tokens picked on the device so far (the host reads them one step later)
    generated: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancelled: bool = False
    done: bool = False
    index: int = 0                  # the choice it is (a request with n choices has n sequences)
    group: list = field(default_factory=list, repr=False, compare=False)  # the request's sequences, this one too
    pending_logprobs: list = field(default_factory=list)  # of tokens whose text is not out yet
    spec: object = None             # speculative decoding state (engine/speculative.SeqSpec)
    prefix: PromptKeys | None = None  # prefix reuse + image cache (prefix_cache.py); None: caches off
    # Constrained decoding (engine/grammar.py): this row's next-token mask needs its previous token
    # accepted first, so a constrained row decodes one token a step (no drafts) and a step holding one
    # is synchronous (`Engine.synchronous`): the previous step's tokens are read before it is launched.
    grammar: object = None          # an xgrammar GrammarMatcher
    tools: ToolCallParser | None = None  # tool calls read out of the content (engine/tools.py)
    # Paged KV (engine/block_manager.py): the tokens of cache it reserves (prompt + max_tokens + the verify's
    # slack), the blocks it holds from admission to its end, and a restored prefix's partial block to copy.
    reserve: int = 0
    blocks: list[int] = field(default_factory=list)
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)


class Step:
    """A launched step: its outputs (slot, sequence or None) in order, and its picks being copied to the
    host (pinned memory, an event). `wait()` returns them (a Picked of host tensors) once they are there."""

    def __init__(self, outputs: list[tuple[int, Sequence | None]], picked: Picked | None = None, event=None):
        self.outputs, self.picked, self.event = outputs, picked, event

    def wait(self) -> Picked | None:
        if self.event is not None:
            self.event.synchronize()
        return self.picked


def to_host(picked: Picked) -> tuple[Picked, object]:
    """Start copying a step's picks to the host without waiting for them: (host Picked, CUDA event)."""
    if picked.tokens.device.type != "cuda":
        return picked, None

    def copy(t):
        if t is None:
            return None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    host = Picked(copy(picked.tokens), copy(picked.logprob), copy(picked.top_ids), copy(picked.top_logprobs))
    event = torch.cuda.Event()
    event.record()
    return host, event


class Engine:
    def __init__(self, runner, channel, processor, limits, generation_config_defaults: bool = True,
                 cache=None):
        self.runner, self.channel, self.processor, self.limits = runner, channel, processor, limits
        self.tokenizer = processor.tokenizer
        self.max_slots = runner.max_slots  # sequences generated together; new ones join at step boundaries
        self.eos_ids = self._eos_ids(runner.model)
        # What a request leaves out comes from the checkpoint's generation_config (config key
        # sampling.generation_config_defaults), as vLLM does.
        self.sampling_defaults = generation_defaults(runner.model.generation_config) \
            if generation_config_defaults else {}
        self.vocab_size = getattr(runner.model.config.text_config, "vocab_size", None)
        self.penalties = PenaltyState(self.max_slots)
        self.token_bytes = TokenBytes(self.tokenizer)
        # (a runner that does not say its vocabulary size -- a test's fake -- gets the tokenizer's)
        self.grammars = Grammars(self.tokenizer, self.vocab_size or len(self.tokenizer), self.eos_ids)
        self._rows: tuple[tuple[int, ...], RowParams, torch.Tensor] | None = None  # the last step's rows
        # transformers' torchvision image processor resizes and normalises on the GPU when asked: the same
        # pixels (max difference 0.0 on a 1024x1024 image) in 37 ms instead of 96 ms on the host (H200 box).
        device = getattr(runner, "device", None)
        self.image_device = {"device": device} if getattr(device, "type", None) == "cuda" and \
            isinstance(processor.image_processor, TorchvisionBackend) and self._processes_on(device) else {}
        # A sequence must fit its slot's cache, and the model's positions.
        self.context_len = min(runner.max_len, runner.model.config.text_config.max_position_embeddings)
        # Paged KV: the blocks every rank holds (runner/slot_state.py), handed out here; None where the
        # runner has no paged cache (a test's fake).
        state = getattr(runner, "state", None)
        self.blocks = BlockPool(state.num_blocks, state.block_size) if state is not None else None
        # a verify writes k positions past a sequence's length; one more for the step computed past its end
        self.kv_slack = getattr(runner, "kv_len", 0) - getattr(runner, "max_len", 0) + 1
        self.waiting: queue.Queue[Sequence] = queue.Queue(maxsize=limits.max_queue)
        self.held: Sequence | None = None  # the queue's head, waiting for free KV blocks (FIFO: nothing passes it)
        self.running: dict[int, Sequence] = {}
        self.ids = itertools.count()
        self.ranks: list[dict] = []
        # Start-up phase: serve.py sets "warming_up" while runner/warmup.py runs, then "ready". Until
        # then /health is 503 and requests are refused (503), so no request ever meets a compilation.
        self.phase = "ready"
        self.warmup: str | None = None  # warm-up progress, for /health
        # Prompt tokens prefilled per step: limits.prefill_chunk_tokens, or what warm-up derived from
        # limits.max_gap_steps and the measured step times.
        self.prefill_budget = limits.prefill_chunk_tokens
        self.prefill_overhead = 0  # a prefill forward's fixed cost in tokens, charged per prompt after the first
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
        # the gap a streaming client sees between two tokens (tokens of one speculative step: 0 apart)
        self.m_itl = Histogram("dsqv_inter_token_seconds", "Time between two consecutive tokens of one sequence",
                               registry=r, buckets=(.005, .01, .02, .035, .05, .075, .1, .15, .25, .5, 1, 2.5, 10))
        self.m_tokens = Counter("dsqv_generated_tokens", "Tokens generated", registry=r)
        self.m_tps = Gauge("dsqv_tokens_per_second", "Generated tokens per second over the last step", registry=r)
        self.m_queue = Gauge("dsqv_queue_depth", "Requests waiting for a slot", registry=r)
        self.m_inflight = Gauge("dsqv_in_flight", "Requests being generated", registry=r)
        self.m_step = Histogram("dsqv_step_seconds", "Wall time of one engine step", registry=r,
                                buckets=(.005, .01, .02, .05, .1, .25, .5, 1, 2.5, 10))
        self.m_blocks_used = Gauge("dsqv_kv_blocks_used", "KV cache blocks held (sequences and prefix snapshots)",
                                   registry=r)
        self.m_blocks_free = Gauge("dsqv_kv_blocks_free", "KV cache blocks free", registry=r)
        self.m_waiting_memory = Gauge("dsqv_waiting_for_memory", "Sequences waiting for free KV blocks", registry=r)
        self.m_memory_waits = Counter("dsqv_memory_waits", "Times a sequence waited in line for free KV blocks",
                                      registry=r)
        if self.blocks is not None:
            self.m_blocks_free.set(self.blocks.capacity)
        spec = getattr(runner, "spec", None)  # speculative decoding, as the runner was built for it
        self.spec = Speculator(spec.method, spec.k, r) if spec is not None else None
        # `cache`: the deployment config's cache section (budgets); None: no prefix reuse, no image cache
        self.prefix_cache = PrefixCache.for_runner(runner, cache, self.tokenizer, r, self.blocks)
        self.trace = StepTrace.from_env()  # engine/trace.py: DSQV_STEP_TRACE, for the served benchmark

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

    def image_unit(self) -> int:
        """Pixels per side of one merged image token (patch size x spatial merge)."""
        vision = self.runner.model.config.vision_config
        return vision.patch_size * vision.spatial_merge_size

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
            messages.append({**message, "content": content})  # tool_calls, tool_call_id as the template reads them
        if len(images) > self.limits.max_images_per_request:
            raise RequestError(400, f"at most {self.limits.max_images_per_request} images per request", "messages")
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
        limit = min(self.limits.max_prompt_tokens or self.context_len, self.context_len - 1)
        if n_prompt > limit:
            raise RequestError(400, f"the prompt is {n_prompt} tokens (images included); the limit is {limit}",
                               "messages", "context_length_exceeded")
        room = self.context_len - n_prompt
        if self.blocks is not None:  # and the KV cache: a sequence reserves its blocks at admission
            room = min(room, self.blocks.capacity * self.blocks.block_size - self.kv_slack - n_prompt)
            if room < 1:
                raise RequestError(400, f"the prompt is {n_prompt} tokens (images included); the KV cache holds "
                                   f"{self.blocks.capacity * self.blocks.block_size - self.kv_slack - 1} "
                                   f"tokens of prompt at most", "messages", "context_length_exceeded")
        max_tokens = request.get("max_tokens") or min(self.limits.max_new_tokens, room)
        if max_tokens > self.limits.max_new_tokens:
            raise RequestError(400, f"max_tokens is {max_tokens}; the limit is {self.limits.max_new_tokens}",
                               "max_tokens")
        if request.get("max_tokens") and self.blocks is not None and max_tokens > room:
            raise RequestError(400, f"the prompt ({n_prompt} tokens) and max_tokens ({max_tokens}) do not fit the "
                               f"KV cache: at most {room} tokens can follow this prompt", "max_tokens",
                               "context_length_exceeded")
        max_tokens = min(max_tokens, room)
        sampling = Sampling.from_request(request, self.sampling_defaults, max_tokens)
        if self.vocab_size is not None and any(t >= self.vocab_size for t in sampling.stop_token_ids):
            raise RequestError(400, f"stop_token_ids holds an id past the vocabulary ({self.vocab_size} tokens)",
                               "stop_token_ids", "invalid_value")
        try:
            compiled = self.grammars.compile(request, prompt_opens_thinking(prompt))
        except GrammarError as e:
            raise RequestError(400, str(e), e.param, "invalid_schema") from None
        pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        if pixels is not None:  # held on the host until the prefill: queued requests take no device memory
            pixels = pixels.cpu()
        # n choices: n sequences with one event queue; choice i draws with seed + i (its own generator).
        events: queue.Queue = queue.Queue()
        group: list[Sequence] = []
        for index in range(request.get("n") or 1):
            generator = None
            if not sampling.greedy:  # on the logits' device: sampling stays there (engine.sample)
                generator = torch.Generator(device=getattr(self.runner, "device", "cpu"))
                generator.manual_seed(sampling.seed + index if sampling.seed is not None else torch.seed())
            stream = TextStream(self.tokenizer, sampling.stop, prompt_opens_thinking(prompt))
            parser = ToolCallParser(tools, request.get("parallel_tool_calls", True)) if tools else None
            group.append(Sequence(next(self.ids), input_ids, pixels, grid.tolist() if grid is not None else [],
                                  sampling, stream, events, generator, index=index, group=group,
                                  grammar=self.grammars.matcher(compiled), tools=parser,
                                  prefix=copy.copy(inputs.get("prefix")),  # each its own reuse state
                                  reserve=n_prompt + max_tokens + self.kv_slack))
        return group[0]

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
        if self.phase != "ready":
            yield RequestError(503, f"the server is starting ({self.phase}); retry once /health is 200",
                               type="service_unavailable_error", code=self.phase).event()
            return
        try:
            seq = self.prepare(request)
        except RequestError as e:
            self.m_requests.labels("rejected").inc()
            yield e.event()
            return
        try:
            for choice in seq.group:
                self.waiting.put_nowait(choice)
        except queue.Full:
            for choice in seq.group:
                choice.cancelled = True  # those already queued are dropped by plan()
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
            for choice in seq.group:
                if not choice.done:
                    choice.cancelled = True  # the client went away: the loop frees its slot at the next step
                    self.wake.set()

    def health(self) -> dict:
        ready = (self.alive and not self.stopping.is_set() and self.phase == "ready"
                 and len(self.ranks) == self.channel.world and all(r.get("ready") for r in self.ranks))
        return {"ready": ready, "phase": self.phase, "warmup": self.warmup, "alive": self.alive, "stopping": self.stopping.is_set(), "failure": self.failure,
                "ranks": self.ranks, "queue_depth": self.queued(), "in_flight": len(self.running),
                "memory": getattr(self.runner, "memory_plan", None)}

    def queued(self) -> int:
        return self.waiting.qsize() + (self.held is not None)

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
        pending: Step | None = None  # the step in flight, its tokens not read yet
        try:
            while not (self.stopping.is_set() and (self.idle() or time.monotonic() >= self.drain_deadline)):
                t_plan = time.perf_counter()
                plan = self.plan()
                if pending is not None and (plan.empty() or self.synchronous(plan)):
                    # nothing to launch before its tokens are known, or this step's picks need them
                    self.busy_since = time.monotonic()
                    self.consume(pending)
                    pending = None
                    self.busy_since = None
                    if plan.empty():
                        continue
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
                pixels = {p.slot: self.running[p.slot].pixel_values for p in plan.prefill if p.pixels_shape}
                if self.spec is not None:  # speculative steps stay synchronous: tokens read in the step
                    self.channel.broadcast(plan)
                    self.after_step(plan, self.runner.run(plan, pixels))
                else:
                    step = self.launch(plan, pixels, self.running)
                    t_launched = time.perf_counter()
                    waited = 0.0
                    if pending is not None:  # step N's tokens, while the device runs step N+1
                        waited = self.consume(pending)
                    pending = step
                    if self.trace is not None:
                        self.trace.step(t=t_plan, plan_s=t0 - t_plan, launch_s=t_launched - t0, wait_s=waited,
                                        consume_s=time.perf_counter() - t_launched - waited,
                                        prefill=[[p.slot, p.start, p.end] for p in plan.prefill],
                                        decode=len(plan.decode))
                self.busy_since = None
                dt = time.perf_counter() - t0
                self.m_step.observe(dt)
                stepped = len(plan.prefill) + len(plan.decode) + len(plan.verify)
                if stepped:
                    self.m_tps.set(stepped / dt)
        except BaseException as e:
            self.fail(f"{type(e).__name__}: {e}")
            raise
        if self.trace is not None:
            self.trace.close()
        self.fail("the server shut down before this request finished (server.shutdown_grace_s)", "shutting_down")
        self.busy_since = time.monotonic()
        self.channel.broadcast(StepPlan(stop=True))
        self.busy_since = None

    def idle(self) -> bool:
        """Nothing queued, nothing left to generate."""
        return self.waiting.empty() and self.held is None and all(
            seq.done or seq.cancelled for seq in self.running.values())

    def heartbeat(self) -> None:
        self.channel.broadcast(StepPlan(heartbeat=True))
        self.ranks = self.channel.gather(self.runner.status())

    def plan(self) -> StepPlan:
        """Every generating sequence decodes one token; prompts are prefilled within a token budget per
        step (limits.prefill_chunk_tokens), continuing ones first, then new sequences in free slots."""
        plan = StepPlan()
        self.prefix_cache.begin_plan(plan)
        # The per-step budget (limits.max_gap_steps) protects streams that decode; when none does, nothing
        # waits on this step and prompts get whole chunks (a burst of new requests is prefilled at full rate).
        decoding = any(not (s.cancelled or s.done) and s.prefilled >= len(s.input_ids) for s in self.running.values())
        budget = self.prefill_budget if decoding else max(self.prefill_budget, self.limits.prefill_chunk_tokens)
        budget += self.prefill_overhead  # the first prefill's overhead is in the budget
        for slot, seq in list(self.running.items()):
            if seq.cancelled or seq.done:
                if seq.cancelled and not seq.done and seq.index == 0:  # once per request
                    self.m_requests.labels("cancelled").inc()
                del self.running[slot]  # the slot's next prefill overwrites its GDN state
                self.release(plan, seq)
                if job := self.prefix_cache.finished(plan, seq):  # a snapshot job in the slot it left, if deferred
                    budget -= job + self.prefill_overhead
            elif seq.prefilled < len(seq.input_ids):
                budget -= self.schedule_prefill(plan, seq, budget - self.prefill_overhead, self.prefill_overhead)
            elif self.spec is not None:
                if seq.next_token is not None:
                    self.spec.schedule(plan, seq)  # its accept, then a verify (with drafts) or a decode
            elif seq.generated + seq.in_flight < seq.sampling.max_tokens:
                # its previous token is on the device already (picked there, maybe not read yet)
                plan.decode.append((slot, FROM_DEVICE))
                seq.in_flight += 1
        free = [s for s in range(self.max_slots) if s not in self.running]
        while free and budget > self.prefill_overhead:
            seq, self.held = self.held, None
            waited = seq is not None
            if seq is None:
                try:
                    seq = self.waiting.get_nowait()
                except queue.Empty:
                    break
            if seq.cancelled:
                if seq.index == 0 and not seq.done:
                    self.m_requests.labels("cancelled").inc()
                continue
            hit = self.prefix_cache.lookup(seq.prefix)
            if not self.reserve(seq, hit):
                if not waited:
                    self.m_memory_waits.inc()
                self.held = seq  # first in line until enough blocks are free (sequences end, snapshots go)
                break
            seq.slot = free.pop(0)  # the lowest free slot: decoding rows stay packed at the front
            self.running[seq.slot] = seq
            seq.prefilled = self.prefix_cache.reuse(seq.prefix, hit)  # a held prefix: its state is restored
            if self.spec is not None:
                self.spec.start(seq)
                if seq.grammar is not None:  # each token's mask needs the token before it: no drafts
                    seq.spec.drafting = False
            budget -= self.schedule_prefill(plan, seq, budget - self.prefill_overhead, self.prefill_overhead)
        if self.spec is not None:
            self.spec.merge(plan)
        self.m_queue.set(self.queued())
        self.m_inflight.set(len(self.running))
        self.m_waiting_memory.set(self.held is not None)
        if self.blocks is not None:
            self.m_blocks_used.set(self.blocks.used)
            self.m_blocks_free.set(len(self.blocks.free))
        return plan

    def reserve(self, seq: Sequence, hit: tuple[int | None, int]) -> bool:
        """Seq's KV blocks for its whole reservation, before it is admitted: a held prefix's (`hit`, from
        prefix_cache.lookup) shared, the rest new, snapshots evicted for room where needed. False: not
        enough blocks free now (nothing changed but the evictions)."""
        if self.blocks is None:
            return True
        snapshot_id, length = hit
        if snapshot_id is not None:
            self.prefix_cache.snapshots.touch(snapshot_id)  # pinned: no eviction below may drop it
        shared, tail = self.prefix_cache.shared_blocks(snapshot_id, length)
        need = self.blocks.blocks_for(seq.reserve) - len(shared)
        if len(self.blocks.free) < need:
            self.prefix_cache.reclaim(need)
        if len(self.blocks.free) < need:
            return False
        self.blocks.share(shared)
        seq.blocks = shared + self.blocks.allocate(need)
        seq.copy_blocks = [(tail, seq.blocks[len(shared)])] if tail is not None else []
        return True

    def release(self, plan: StepPlan, seq: Sequence) -> None:
        """An ended sequence's blocks go back (those a snapshot holds stay); its slot's table to the null block."""
        if self.blocks is not None and seq.blocks:
            self.blocks.release(seq.blocks)
            seq.blocks = []
            plan.release.append(seq.slot)

    def schedule_prefill(self, plan: StepPlan, seq: Sequence, budget: int, overhead: int = 0) -> int:
        """The next chunk of seq's prompt (at most `budget` tokens) into the plan; returns what it costs
        of the step's budget: its length plus `overhead` for each forward (nothing when no chunk fits).

        Where the prefix cache splits the chunk at its snapshot position (two forwards), the part after
        it waits for the next step when the budget has no room for a second forward's fixed cost: on
        one H200 (27B, 2026-12-02) those split chunks put ~100 gaps of 100-150 ms into every 16-stream
        burst against a 50 ms prefill step (benchmarks/bench_served.py's step trace)."""
        start = seq.prefilled
        end = min(len(seq.input_ids), start + budget)
        if end <= start:
            return 0
        begins = start == (seq.prefix.cached if seq.prefix else 0)  # the sequence's first chunk
        first = begins and seq.pixel_values is not None
        item = Prefill(seq.slot, seq.input_ids, seq.image_grid_thw if begins else [],
                       tuple(seq.pixel_values.shape) if first else None, start, end)
        if begins and self.blocks is not None:  # the sequence's KV blocks go with its first chunk
            item.blocks, item.copy_blocks = list(seq.blocks), seq.copy_blocks
        # prefix reuse / image cache: restore, snapshot (the chunk split there), only uncached images' pixels
        items, pixels = self.prefix_cache.schedule(seq.prefix, item, seq.pixel_values if first else None,
                                                   seq.blocks)
        if len(items) > 1 and end - start + overhead > budget:
            items = items[:1]  # [start, snapshot) now, the rest in a step of its own
            end = items[0].end
        if begins:
            seq.pixel_values = pixels
        plan.prefill.extend(items)
        seq.prefilled = end
        if end == len(seq.input_ids):
            seq.in_flight += 1  # the prompt's last chunk gives the first token
        return end - start + overhead * len(items)

    def synchronous(self, plan: StepPlan) -> bool:
        """Whether this step must wait for the previous step's tokens on the host before it is launched:
        a pick that depends on the host's view of the tokens so far (a grammar's state for token_mask)
        must return True here for the sequences it constrains; speculative steps always do."""
        # A constrained row's mask comes from its matcher, which must have accepted the token before.
        return self.spec is not None or any(self.running[slot].grammar is not None for slot, _ in plan.decode)

    def launch(self, plan: StepPlan, pixels: dict[int, torch.Tensor], seqs: dict[int, Sequence] | None = None) -> Step:
        """Broadcast and run one step; its tokens are picked and fed to the next step on the device, and
        start on their way to the host (`Step.wait`). `seqs`: the sequence of each slot (None: greedy
        picks and nothing to read, as warm-up's text prompts run)."""
        self.channel.broadcast(plan)
        logits = self.runner.run(plan, pixels)
        if not logits:
            return Step([])
        slots = list(logits)
        outputs = [(slot, (seqs or {}).get(slot)) for slot in slots]
        rows = torch.stack(list(logits.values()))
        if all(seq is not None for _, seq in outputs):
            # Every row's token is picked where the logits are, all rows at once (engine.sampling)
            picked = self.pick(rows, [seq for _, seq in outputs])
        else:
            picked = Picked(rows.argmax(-1))
        if self.spec is None:  # as follower_loop decides: speculative steps carry their tokens in the plan
            self.runner.feed(slots, picked.tokens)
        return Step(outputs, *to_host(picked))

    def consume(self, step: Step) -> float:
        """The host's side of a step, one step late: its tokens into text and events (one host copy per
        step, started at launch). Returns the seconds spent waiting for the tokens."""
        t = time.perf_counter()
        picked = step.wait()
        now = time.perf_counter()
        if picked is None:
            return now - t
        tokens = picked.tokens.tolist()
        logprobs = self.logprob_entries(picked, tokens, [seq.sampling if seq else None for _, seq in step.outputs])
        for i, ((_, seq), token) in enumerate(zip(step.outputs, tokens)):
            if seq is None or seq.done or seq.cancelled:
                continue  # computed after the sequence ended (one step late): never emitted
            seq.in_flight -= 1
            if logprobs is not None and logprobs[i] is not None:
                seq.pending_logprobs.append(logprobs[i])
            seq.pixel_values = None  # prefilled: the pixels are no longer needed
            self.deliver(seq, token, now)
        return now - t

    def after_step(self, plan: StepPlan, logits: dict[int, torch.Tensor]) -> None:
        now = time.perf_counter()
        if not logits:
            return
        # Verified rows ([T, vocab] each) give a sequence several tokens (engine/speculative.py); a verified
        # row without usable drafts is an ordinary row: its first position's logits.
        verified = {}
        for slot, _ in plan.verify:
            rows, seq = logits.pop(slot), self.running[slot]
            drafts = self.spec.drafts(seq, self.runner.verified[slot])
            if drafts:
                verified[slot] = (rows, drafts)
            else:
                seq.spec.accept = 0
                logits[slot] = rows[0]
        if logits:
            # Every row's token is picked where the logits are, all rows at once (engine.sampling), then one
            # copy to the host: one sync per step, not per row.
            picked = self.pick(torch.stack(list(logits.values())), [self.running[slot] for slot in logits])
            tokens = picked.tokens.tolist()
            logprobs = self.logprob_entries(picked, tokens, [self.running[slot].sampling for slot in logits])
            for i, (slot, token) in enumerate(zip(logits, tokens)):
                seq = self.running[slot]
                if logprobs is not None and logprobs[i] is not None:
                    seq.pending_logprobs.append(logprobs[i])
                seq.pixel_values = None  # prefilled: the pixels are no longer needed
                self.deliver(seq, token, now)
        for slot, (rows, drafts) in verified.items():
            seq = self.running[slot]
            for token in self.spec.tokens(seq, rows, drafts):
                if self.deliver(seq, token, now):
                    break

    def deliver(self, seq: Sequence, token: int, now: float) -> bool:
        """One new token of seq: text events, stop checks; True when the sequence has finished."""
        seq.generated += 1
        self.m_tokens.inc()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.m_ttft.observe(now - seq.created)
        else:
            self.m_itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        finish = None
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            finish = "stop"  # cannot happen (the token was picked under the grammar's mask); never loop on it
        elif token in seq.sampling.stop_token_ids or (token in self.eos_ids and not self.through_eos(seq)):
            finish = "stop"
        else:
            reasoning, content = seq.stream.add(token)
            self.emit(seq, reasoning, content)
            if seq.stream.stopped or (seq.tools is not None and seq.tools.done):
                finish = "stop"
            elif seq.generated >= seq.sampling.max_tokens:
                finish = "length"
        if finish:
            self.emit(seq, *seq.stream.finish(), final=True)
            self.finish(seq, finish)
            return True
        seq.next_token = token
        return False

    @staticmethod
    def through_eos(seq: Sequence) -> bool:
        """ignore_eos: an end-of-sequence token is one more token (its text, if any, is a special token's:
        skipped). Not under a grammar, whose end is an end-of-sequence token that nothing may follow."""
        return seq.sampling.ignore_eos and seq.grammar is None

    def pick(self, rows: torch.Tensor, seqs: list[Sequence]) -> Picked:
        """The next token of every row ([R, V] logits of `seqs`), on the logits' device."""
        key = tuple(seq.id for seq in seqs)
        if self._rows is None or self._rows[0] != key:  # the batch changed: its parameters to the device
            params = RowParams.build([s.sampling for s in seqs], [s.generator for s in seqs], rows.shape[-1],
                                     rows.device)
            # pinned (to_device): a plain torch.tensor(..., device=) here would make the host wait for the
            # step just launched whenever a stream joins or leaves the batch, which delays the previous
            # step's tokens by a whole step
            self._rows = (key, params, to_device(torch.tensor([s.slot for s in seqs]), rows.device))
        _, params, slots = self._rows
        counts = prompt = None
        if params.use_penalties:
            for seq in seqs:
                if seq.picked == 0 and seq.sampling.penalised:  # its first token: counts start at 0
                    self.penalties.start(seq.slot, seq.input_ids, rows.shape[-1], rows.device)
            if self.penalties.counts is not None:
                counts, prompt = self.penalties.rows(slots)
        picked = sample(rows, params, counts, prompt, self.token_mask(seqs, rows))
        if counts is not None:
            self.penalties.record(slots, picked.tokens)
        for seq in seqs:  # counted here, not when the host reads it: that is one step later
            seq.picked += 1
        return picked

    def token_mask(self, seqs: list[Sequence], rows: torch.Tensor) -> torch.Tensor | None:
        """Constrained decoding: a [R, V] additive mask (0 allowed, -inf not) of the tokens each row may
        take, from its grammar (engine/grammar.py), applied before the penalties and sampling. None: no
        row is constrained. The host fills the bitmasks before anything reads the rows, so on a GPU that
        work overlaps the forward still running."""
        matchers = [None if seq.done else seq.grammar for seq in seqs]  # a row computed past its end: free
        return None if all(m is None for m in matchers) else self.grammars.additive_mask(matchers, rows)

    def logprob_entries(self, picked: Picked, tokens: list[int],
                        rows: list[Sampling | None]) -> list[dict | None] | None:
        """OpenAI logprob entries of the rows that asked for them (None for the others)."""
        if picked.logprob is None:
            return None
        chosen = picked.logprob.tolist()
        top_ids = picked.top_ids.tolist() if picked.top_ids is not None else None
        top_lps = picked.top_logprobs.tolist() if picked.top_logprobs is not None else None
        out: list[dict | None] = []
        for i, s in enumerate(rows):
            if s is None or not s.logprobs:
                out.append(None)
                continue
            k = s.top_logprobs
            top = list(zip(top_ids[i][:k], top_lps[i][:k])) if k and top_ids is not None else []
            out.append(self.token_bytes.entry(tokens[i], chosen[i], top))
        return out

    @staticmethod
    def emit(seq: Sequence, reasoning: str, content: str, final: bool = False) -> None:
        calls: list[dict] = []
        if seq.tools is not None:  # only the content: a call written inside the reasoning is not a call
            content, calls = seq.tools.feed(content)
            if final:
                rest, more = seq.tools.finish()
                content, calls = content + rest, calls + more
        if reasoning or content or calls:
            event = {"event": "delta", "index": seq.index, "content": content, "reasoning_content": reasoning}
            if calls:
                event["tool_calls"] = calls
            if seq.sampling.logprobs:  # the tokens up to this text (some held back text until now)
                event["logprobs"], seq.pending_logprobs = seq.pending_logprobs, []
            seq.events.put(event)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.done = True
        if reason == "stop" and seq.tools is not None and seq.tools.calls:
            reason = "tool_calls"
        # This choice's end (with the logprobs of tokens that produced no text); the request's end once
        # every choice has ended.
        event = {"event": "delta", "index": seq.index, "content": "", "reasoning_content": "",
                 "finish_reason": reason}
        if seq.sampling.logprobs:
            event["logprobs"], seq.pending_logprobs = seq.pending_logprobs, []
        seq.events.put(event)
        if not all(s.done for s in seq.group):
            return
        n_prompt = len(seq.input_ids)
        generated = sum(s.generated for s in seq.group)
        seq.events.put({"event": "done", "finish_reason": reason,
                        "usage": {"prompt_tokens": n_prompt, "completion_tokens": generated,
                                  "total_tokens": n_prompt + generated,
                                  "prompt_tokens_details": {"cached_tokens": seq.prefix.cached if seq.prefix else 0}}})
        self.m_requests.labels("completed").inc()

    def fail(self, why: str, code: str = "engine_down") -> None:
        """Every request in flight or queued gets a 503; the engine refuses new ones from now on.

        Also called from the watchdog thread while the main thread is stuck in a step."""
        self.alive, self.failure = False, why
        error = RequestError(503, f"the engine stopped: {why}", type="service_unavailable_error", code=code).event()
        failed = [seq for seq in list(self.running.values()) if not (seq.done or seq.cancelled)]
        held, self.held = self.held, None
        if held is not None:
            failed.append(held)
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
