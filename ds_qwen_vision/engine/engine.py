"""Rank 0's engine: the IPC handler (`generate`, `health`, `metrics`) and the loop, over its rooms --
intake.py (request -> sequences), scheduler.py (each step's plan, from the sequences' state), output.py
(picks, tokens into events, per-sequence isolation).

The loop keeps one step in flight: it plans, broadcasts and launches step N+1, then reads step N's
tokens (already picked on the device, and already fed to step N+1 there) and does the host work --
detokenization, stop strings, logprob entries, events -- while the GPU runs N+1. A sequence that ends
at step N (end of sequence, a stop string or token) is therefore computed once more in step N+1; that
token is dropped, never emitted. max_tokens is counted when steps are scheduled, so it costs no extra
step. A step whose picks need the host's view of the tokens so far (`Scheduler.synchronous`) waits for
them first. With speculative decoding (engine/speculative.py) a step that verifies drafts, or whose
sequences will (`StepPlan.hold`), holds its tokens: the next plan is made from them (accepted counts, the
next token), so they are read and accepted in the step (`accept`); their text and events wait until the
next step is launched (`deliver_held`), and go out while the GPU runs it. A step of sequences that do not
draft (stopped, or never: logprobs, penalties, grammars) runs overlapped like a plain one.

Failures: one request's own host work is isolated (output.py); anything else in a step -- the forward, a
collective, reading the tokens -- fails every request with a 503 and ends `run` (serve.py exits).
"""
from __future__ import annotations

import math
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

import torch

from ..ipc import error_event, start_event
from ..model import log
from ..plan import StepPlan
from .block_manager import BlockPool
from .intake import Intake
from .metrics import EngineMetrics
from .output import Output
from .prefix_cache import PrefixCache
from .sampling import Picked
from .scheduler import RequestQueue, Scheduler
from .sequence import RequestError, Sequence
from .speculative import Speculator
from .trace import StepTrace

HEARTBEAT_S = 1.0


@dataclass
class Held:
    """A held step's tokens, read and accepted but not yet delivered (Engine.accept, deliver_held): its plain
    rows' picks (host) with their sequences, and each verified sequence's tokens."""
    picked: Picked | None = None
    seqs: list[Sequence] = field(default_factory=list)
    verified: list[tuple[Sequence, list[int]]] = field(default_factory=list)


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
        self.m = EngineMetrics()
        # Paged KV: the blocks every rank holds (runner/slot_state.py), handed out here; None where the
        # runner has no paged cache (a test's fake).
        state = getattr(runner, "state", None)
        self.blocks = BlockPool(state.num_blocks, state.block_size) if state is not None else None
        spec = getattr(runner, "spec", None)  # speculative decoding, as the runner was built for it
        self.spec = Speculator(spec.method, spec.k, self.m.registry, spec.rows) if spec is not None else None
        # `cache`: the deployment config's cache section (budgets); None: no prefix reuse, no image cache
        self.prefix_cache = PrefixCache.for_runner(runner, cache, processor.tokenizer, self.m.registry, self.blocks)
        # a verify writes k positions past a sequence's length; one more for the step computed past its end
        kv_slack = getattr(runner, "kv_len", 0) - getattr(runner, "max_len", 0) + 1
        waiting = RequestQueue(limits.max_queue, limits.max_queued_pixels)
        self.scheduler = Scheduler(runner.max_slots, limits.prefill_chunk_tokens, waiting, self.blocks,
                                   self.prefix_cache, self.spec, self.m, kv_slack)
        self.intake = Intake(runner, processor, limits, self.scheduler, self.prefix_cache, generation_config_defaults)
        self.output = Output(self.intake, runner.max_slots, self.m, self.scheduler)
        self.ranks: list[dict] = []
        # Start-up phase: serve.py sets "warming_up" while engine/warmup.py runs, then "ready". Until
        # then /health is 503 and requests are refused (503), so no request ever meets a compilation.
        self.phase = "ready"
        self.warmup: str | None = None  # warm-up progress, for /health
        self.alive = True
        self.failure: str | None = None
        self.stopping = threading.Event()
        self.drain_deadline = math.inf  # after stop(): monotonic time by which in-flight work must be over
        self.busy_since: float | None = None  # monotonic start of the collective in progress (the watchdog's view)
        self.wake = threading.Event()
        self.trace = StepTrace.from_env()  # engine/trace.py: DSQV_STEP_TRACE, for the served benchmark
        self.held: Held | None = None  # the last held step's tokens, their text not out yet (deliver_held)

    @property
    def running(self) -> dict[int, Sequence]:
        return self.scheduler.running

    # ---- the IPC handler (IPC threads) ---------------------------------------------------------------
    def generate(self, request: dict):
        """Yields the events of one request (ipc.py's contract). Closing the generator cancels the request."""
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
        request = {**request, "request_id": request.get("request_id") or uuid.uuid4().hex}
        try:
            seq = self.intake.prepare(request)
        except RequestError as e:
            self.m.outcome("rejected")
            yield e.event()
            return
        except Exception:  # a bug, not the request's fault: this request's 500, the engine goes on
            log(f"[rank 0] request {request['request_id']}: intake failed\n{traceback.format_exc()}")
            self.m.outcome("failed")
            yield error_event(500, f"the server failed to prepare this request (request id "
                                   f"{request['request_id']}; its log has the details)", code="internal_error")
            return
        refused = self.scheduler.add(seq.group)
        if refused is not None:
            self.m.outcome("queue_full")
            message = "the request queue is full; retry later" if refused == "queue_full" else \
                f"the queued requests' images hold {self.scheduler.waiting.pixels:,} pixels; with this request's " \
                f"{seq.pixels:,} that is over limits.max_queued_pixels ({self.limits.max_queued_pixels:,}); retry later"
            yield RequestError(429, message, type="rate_limit_error", code="queue_full").event()
            return
        self.wake.set()
        if not self.alive:  # failed between the check above and the put: fail() may have drained already
            self.fail(self.failure)
        try:
            yield start_event(len(seq.input_ids))
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
            if not all(choice.done for choice in seq.group):
                self.scheduler.cancel(seq.group)  # the client went away: out of the queue now, out of its slot next step
                self.wake.set()

    def health(self) -> dict:
        ready = (self.alive and not self.stopping.is_set() and self.phase == "ready"
                 and len(self.ranks) == self.channel.world and all(r.get("ready") for r in self.ranks))
        return {"ready": ready, "phase": self.phase, "warmup": self.warmup, "alive": self.alive,
                "stopping": self.stopping.is_set(), "failure": self.failure, "ranks": self.ranks,
                "queue_depth": self.scheduler.queued(), "in_flight": len(self.running),
                "memory": getattr(self.runner, "memory_plan", None)}

    def metrics(self) -> str:
        return self.m.text()

    # ---- the loop (main thread of rank 0) ------------------------------------------------------------
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
                pending, worked = self.step(pending)
                if worked:
                    continue
                if time.monotonic() - last_beat >= HEARTBEAT_S:
                    self.heartbeat()
                    last_beat = time.monotonic()
                self.wake.wait(0.05)
                self.wake.clear()
        except BaseException as e:
            self.fail(f"{type(e).__name__}: {e}")
            raise
        if self.trace is not None:
            self.trace.close()
        self.fail("the server shut down before this request finished (server.shutdown_grace_s)", "shutting_down")
        self.busy_since = time.monotonic()
        self.channel.broadcast(StepPlan(stop=True))
        self.busy_since = None

    def step(self, pending: Step | None) -> tuple[Step | None, bool]:
        """One turn of the loop: plan, launch, and read the previous step's tokens while this one runs.
        Returns the step now in flight and whether there was anything to do (False: idle)."""
        t_plan = time.perf_counter()
        plan = self.scheduler.schedule()
        if self.held is not None and (plan.empty() or (self.scheduler.synchronous(plan) and not plan.hold)):
            self.deliver_held()  # nothing to launch first, or this step's picks need the host's view (grammar)
            if plan.empty():  # (a held step leaves nothing pending)
                return pending, True
        if pending is not None and (plan.empty() or self.scheduler.synchronous(plan)):
            # nothing to launch before its tokens are known, or this step's picks need them
            self.busy_since = time.monotonic()
            self.consume(pending)
            pending = None
            self.busy_since = None
            if plan.empty():
                return None, True
        if plan.empty():
            return None, False
        t0 = time.perf_counter()
        self.busy_since = time.monotonic()
        pixels = {p.slot: self.running[p.slot].pixel_values for p in plan.prefill if p.pixels_shape}
        if plan.hold:  # a speculative step whose tokens the next plan needs: read in the step
            self.channel.broadcast(plan)
            logits = self.runner.run(plan, pixels)
            self.deliver_held()  # the last held step's text, while the device runs this one
            self.held = self.accept(plan, logits)
        else:
            step = self.launch(plan, pixels, self.running)
            for _, seq in step.outputs:
                if seq is not None:
                    seq.fed = True  # its next token is on the device: the next plan says FROM_DEVICE
            t_launched = time.perf_counter()
            self.deliver_held()
            waited = 0.0
            if pending is not None:  # step N's tokens, while the device runs step N+1
                waited = self.consume(pending)
            pending = step
            if self.trace is not None:
                self.trace.step(t=t_plan, plan_s=t0 - t_plan, launch_s=t_launched - t0, wait_s=waited,
                                consume_s=time.perf_counter() - t_launched - waited,
                                prefill=[[p.slot, p.start, p.end] for p in plan.prefill], decode=len(plan.decode))
        self.busy_since = None
        dt = time.perf_counter() - t0
        self.m.step.observe(dt)
        stepped = len(plan.prefill) + len(plan.decode) + len(plan.verify)
        if stepped:
            self.m.tps.set(stepped / dt)
        return pending, True

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
            picked = self.output.pick(rows, [seq for _, seq in outputs])
        else:
            picked = Picked(rows.argmax(-1))
        if not plan.hold:  # as follower_loop decides
            self.runner.feed(slots, picked.tokens)
        return Step(outputs, *to_host(picked))

    def consume(self, step: Step) -> float:
        """The host's side of a step, one step late: its tokens into text and events (one host copy per
        step, started at launch). Returns the seconds spent waiting for the tokens."""
        t = time.perf_counter()
        picked = step.wait()
        now = time.perf_counter()
        if picked is not None:
            self.output.read(picked, [seq for _, seq in step.outputs], now)
        return now - t

    def accept(self, plan: StepPlan, logits: dict[int, torch.Tensor]) -> Held | None:
        """A held (speculative) step's tokens, read now because the next plan is made from them: each
        sequence's next token and, for a verify, the drafts it accepted (counted in `in_flight` until their
        text is out). Their text, stop checks and events wait for `deliver_held`, after the next step is
        launched. A sequence that ended in the last held step's delivery, after this step was planned, gets
        nothing from it."""
        if not logits:
            return None
        stepped = [self.running[slot] for slot in logits]
        held = Held()
        # Verified rows ([T, vocab] each) give a sequence several tokens (engine/speculative.py); a verified
        # row without usable drafts is an ordinary row: its first position's logits.
        verified = {}
        for slot, _ in plan.verify:
            rows, seq = logits.pop(slot), self.running[slot]
            drafts = self.spec.drafts(seq, self.runner.verified[slot]) if not seq.ended else []
            if drafts:
                verified[slot] = (rows, drafts)
            else:
                seq.spec.accept = 0
                logits[slot] = rows[0]
        if logits:
            # Every row's token is picked where the logits are, all rows at once (engine.sampling), then one
            # copy to the host: one sync per step, not per row. Each is its sequence's next token now; the
            # scheduler counted it in in_flight, and Output.read delivers it.
            seqs = [self.running[slot] for slot in logits]
            picked, event = to_host(self.output.pick(torch.stack(list(logits.values())), seqs))
            if event is not None:
                event.synchronize()
            held.picked, held.seqs = picked, seqs
            for seq, token in zip(seqs, held.picked.tokens.tolist()):
                seq.next_token, seq.in_flight = token, 1  # Output.read takes it out of in_flight
        # the greedy rows' argmax at every position: one copy to the host for all of them
        greedy = [slot for slot in verified if self.running[slot].sampling.greedy or self.running[slot].generator is None]
        argmax = dict(zip(greedy, torch.stack([verified[s][0] for s in greedy]).argmax(-1).tolist())) if greedy else {}
        for slot, (rows, drafts) in verified.items():
            seq = self.running[slot]
            tokens = self.output.guard(seq, "sampling", self.spec.tokens, seq, rows, drafts, argmax.get(slot))
            if tokens and not seq.ended:
                seq.next_token, seq.in_flight = tokens[-1], len(tokens)
                held.verified.append((seq, tokens))
        for seq in stepped:
            seq.fed = False
        return held

    def deliver_held(self) -> None:
        """The last held step's tokens into text and events (Output), then nothing of it is in flight."""
        held, self.held = self.held, None
        if held is None:
            return
        now = time.perf_counter()
        if held.picked is not None:
            self.output.read(held.picked, held.seqs, now)
        for seq, tokens in held.verified:
            seq.in_flight -= len(tokens)
            for token in tokens:
                if seq.ended or self.output.deliver(seq, token, now):
                    break

    def idle(self) -> bool:
        return self.scheduler.idle()

    def heartbeat(self) -> None:
        self.busy_since = time.monotonic()
        self.channel.broadcast(StepPlan(heartbeat=True))
        self.ranks = self.channel.gather(self.runner.status())
        self.busy_since = None

    def fail(self, why: str, code: str = "engine_down") -> None:
        """Every request in flight or queued gets a 503; the engine refuses new ones from now on.

        Also called from the watchdog thread while the main thread is stuck in a step."""
        self.alive, self.failure = False, why
        error = RequestError(503, f"the engine stopped: {why}", type="service_unavailable_error", code=code).event()
        for seq in self.scheduler.take_all():
            seq.done = True
            seq.events.put(error)
            self.m.outcome("failed")

    def stop(self, grace_s: float = 0.0) -> None:
        """Refuse new requests (503) and end run() once the work in flight is done, or after ``grace_s``.

        Safe from a signal handler; a second call can only bring the deadline closer."""
        self.drain_deadline = min(self.drain_deadline, time.monotonic() + grace_s)
        self.stopping.set()
        self.wake.set()
