"""The input projections of a layer, as one call per layer kind.

Other code (the Gated DeltaNet decode/verify forward in kernels/gdn.py, the MTP head) asks for a layer's
projections through these functions and never reads the projection modules itself, so that fusing them
(one GEMM for several checkpoint weights) changes this file alone.

The fused weights are made at load (tp_policy.fuse_projections: each member's weight is a view of its
rows of one storage, so this rank's fused weight is the concatenation of the shard table's cuts). A
module without one (never fused) runs its members one by one: the reference path, same values. FP8 members
(fp8.py) are fused in FP8: one block-scaled GEMM (or one dequantize) for the group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tp_policy import FUSED_SCALE, FUSED_SPLITS, fused_weight


def fused_projection(module, hidden: torch.Tensor, members: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """module's member projections of hidden, as one GEMM when they share a fused weight.
    The outputs are column slices of one [.., sum of rows] tensor (views, not contiguous)."""
    fused = fused_weight(module)
    if fused is None:
        return tuple(getattr(module, m)(hidden) for m in members)
    scale = getattr(module, FUSED_SCALE, None)
    if scale is None:
        out = F.linear(hidden, fused)
    else:  # FP8 members fused in FP8 (fp8.fuse_fp8)
        from ..fp8 import matmul

        out = matmul(hidden, fused, scale, module.fp8_block, module.fp8_gemm)
    return torch.split(out, getattr(module, FUSED_SPLITS), dim=-1)


def gdn_in_proj(gdn, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Qwen3_5GatedDeltaNet's input projections of hidden [b, t, hidden_size]:
    mixed_qkv [b, t, 2*key_dim + value_dim] (channels [q | k | v], before the conv), z [b, t, value_dim],
    b [b, t, num_v_heads], a [b, t, num_v_heads] -- this rank's heads. One GEMM (in_proj_qkv | z | b | a);
    the four are column views of its output."""
    return fused_projection(gdn, hidden, ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"))
