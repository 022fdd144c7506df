"""Compiled RMSNorms: transformers' own norm classes, each compiled once (see compile_norms), for the
steps that are replayed as CUDA graphs (decode, verify); prefill runs them eagerly (eager_norms)."""
from __future__ import annotations

import contextlib
import types

import torch

_compiled = True  # False inside eager_norms()


@contextlib.contextmanager
def eager_norms():
    """The RMSNorms as transformers runs them, for a prefill forward. A compiled call costs host time
    (dynamo's guards, the generated wrapper) that a graph replay hides and an eager prefill pays 209 times
    a forward: on one H200 (27B shapes, 2026-12-02) first logits for 512 tokens took 174.7 ms with the
    compiled norms and 139.3 ms without, in the same run."""
    global _compiled
    previous, _compiled = _compiled, False
    try:
        yield
    finally:
        _compiled = previous


def _switch(compiled_forward, eager_forward):
    def forward(self, *args, **kwargs):
        return (forward.compiled if _compiled else forward.eager)(self, *args, **kwargs)
    forward.compiled, forward.eager = compiled_forward, eager_forward
    return forward


def compile_norms(model) -> None:
    """torch.compile the language model's RMSNorms: ~8 elementwise kernels each become one.

    A token passes 209 of them (2 per layer, q/k norms, the GDN output norm, the final one): about
    half of the ~3,300 kernels of a decode step. All instances of a class share one compiled graph
    (transformers' modules are inlined, their weights are inputs), with dynamic batch/sequence sizes,
    so compilation happens once per class and shape rank, not per layer or per prompt length.
    """
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm, Qwen3_5RMSNormGated

    # One compiled function per class: Module.compile() would compile the shared Module._call_impl, and
    # all classes and shapes together would exhaust dynamo's recompile limit (8 per code object).
    # Each class still sees a few variants (3D / 4D inputs, size-1 batch or sequence specialised).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    compiled = {}
    for module in model.model.language_model.modules():
        cls = type(module)
        if cls in (Qwen3_5RMSNorm, Qwen3_5RMSNormGated):
            if cls not in compiled:
                compiled[cls] = _switch(torch.compile(cls.forward, dynamic=True), cls.forward)
            module.forward = types.MethodType(compiled[cls], module)
