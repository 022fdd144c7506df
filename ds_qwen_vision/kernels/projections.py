"""The input projections of a layer, as one call per layer kind.

Other code (the Gated DeltaNet decode/verify forward in kernels/gdn.py, the MTP head) asks for a layer's
projections through these functions and never reads the projection modules itself, so that fusing them
(one GEMM for several checkpoint weights) changes this file alone.
"""
from __future__ import annotations

import torch


def gdn_in_proj(gdn, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Qwen3_5GatedDeltaNet's input projections of hidden [b, t, hidden_size]:
    mixed_qkv [b, t, 2*key_dim + value_dim] (channels [q | k | v], before the conv), z [b, t, value_dim],
    b [b, t, num_v_heads], a [b, t, num_v_heads] -- this rank's heads."""
    return gdn.in_proj_qkv(hidden), gdn.in_proj_z(hidden), gdn.in_proj_b(hidden), gdn.in_proj_a(hidden)
