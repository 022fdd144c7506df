"""Compiled RMSNorms: transformers' own norm classes, each compiled once (see compile_norms), for the
steps replayed as CUDA graphs (decode, verify); ModelRunner.prefill runs them eagerly."""
from __future__ import annotations

import types

import torch


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
                compiled[cls] = torch.compile(cls.forward, dynamic=True)
            module.forward = types.MethodType(compiled[cls], module)
