"""Qwen's block-wise FP8 checkpoints (Qwen3.6-27B-FP8): the format, and the linears that keep their weights in it.

The format, as the checkpoint's config.json says it (`quantization_config`): `quant_method` "fp8", `fmt` "e4m3",
`activation_scheme` "dynamic", `weight_block_size` [128, 128], `modules_to_not_convert` (the vision tower,
lm_head, embed_tokens, norms, the GDN layers' conv1d / in_proj_a / in_proj_b, mtp.fc, ...). A converted
linear stores `weight` as float8_e4m3fn [out, in] and `weight_scale_inv` float32 [ceil(out / b0),
ceil(in / b1)]: the real weight is weight x scale_inv, block by block. Which linears are converted is
transformers' rule (`should_convert_module` over `modules_to_not_convert`), checked against the files at load
(loading.py): a converted linear whose file holds no scale, or an unconverted one that has one, is a
CheckpointError -- a loader that reads an FP8 weight as bf16 without its scale serves garbage.

Sharding: a converted linear keeps its shard rule (tp_policy.SHARD_TABLE) and its DeepSpeed layer; its scale is
cut along the same dimension in block units (`scale_ranges`), which needs every rank's cut to fall on a block
boundary: `convert` refuses a tp where one does not, at start (`scale_cut` for every rank). After DeepSpeed has allocated the shards,
`convert` swaps each such layer's weight for an FP8 one of the same shape, adds its scale and gives the layer
the class below that computes with them (the column- and row-parallel layers keep their collectives).

Compute, two paths:
* the reference: the weight dequantized block-wise (float32, then the activation's dtype) and multiplied as
  the layer did. CPU ranks run it, and GPUs for a layer the GEMM below does not take.
* the GEMM (CUDA, blocks of 128 x 128): PyTorch's own block-scaled FP8 matmul (torch.nn.functional.scaled_mm,
  or torch._scaled_mm on an older torch; cuBLASLt), the weight's 128 x 128 scales as stored, the activation quantized per token and 128 columns
  (Qwen's `activation_scheme: dynamic`, DeepSeek's recipe). Whether this device runs it is decided once, at
  start-up, by a probe against the reference path (`probe_gemm`); the ranks agree, a device or torch build
  without it keeps the reference path and the log says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from .kernels import fp8_linear

FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class Fp8Format:
    block: tuple[int, int]            # weight_block_size: [rows, columns] of one scale
    not_convert: tuple[str, ...]      # modules_to_not_convert

    @classmethod
    def from_config(cls, config) -> Fp8Format | None:
        """The checkpoint's FP8 format, or None for a checkpoint without one (left untouched)."""
        q = getattr(config, "quantization_config", None)
        if q is None:
            return None
        return cls.from_dict(q if isinstance(q, dict) else q.to_dict())

    @classmethod
    def from_dict(cls, q: dict) -> Fp8Format:
        """From config.json's `quantization_config`; ValueError naming what is not served."""
        method = str(q.get("quant_method", "")).lower()
        if method != "fp8":
            raise ValueError(f"quantization_config.quant_method {method!r}: ds-qwen-vision serves bf16 checkpoints "
                             f"and Qwen's block-wise FP8 ones (quant_method fp8)")
        problems = []
        if q.get("fmt", "e4m3") != "e4m3":
            problems.append(f"fmt {q.get('fmt')!r} (e4m3 only)")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            problems.append(f"activation_scheme {q.get('activation_scheme')!r} (dynamic only)")
        block = q.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            problems.append(f"weight_block_size {block!r} (two positive integers: per-tensor scales are not served)")
        if problems:
            raise ValueError("quantization_config: " + "; ".join(problems))
        return cls(tuple(block), tuple(q.get("modules_to_not_convert") or ()))

    def converts(self, module_name: str) -> bool:
        """Whether the language-model linear `module_name` (checkpoint naming) is stored in FP8: transformers'
        rule over modules_to_not_convert (a prefix up to a module boundary, a regex, or a suffix)."""
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module(module_name, list(self.not_convert))


def tp_problems(text_config, quantization_config: dict, tp: int) -> list[str]:
    """Why this FP8 format cannot be served at `tp` (empty: it can), from config.json alone -- the launcher asks
    before any rank starts: a format it does not serve, or a converted linear whose tp cut falls inside a
    scale block (the check `convert` repeats on every rank)."""
    from .tp_policy import rule_for

    try:
        fmt = Fp8Format.from_dict(quantization_config)
    except ValueError as e:
        return [str(e)]
    like = SimpleNamespace(config=SimpleNamespace(text_config=text_config))
    problems = []
    for i, kind in enumerate(text_config.layer_types):
        members = ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj") \
            if kind == "linear_attention" else ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                 "self_attn.o_proj")
        for member in (*members, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            name = f"model.language_model.layers.{i}.{member}"
            if rule_for(name + ".weight") is None or not fmt.converts(name):
                continue
            try:
                for rank in range(tp):
                    scale_cut(like, name + ".weight", tp, rank, fmt.block)
            except ValueError as e:
                problems.append(str(e))
    return sorted(set(problems))


def scale_shape(shape, block) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def scale_ranges(ranges: list[tuple[int, int]], size: int, block: int, name: str) -> list[tuple[int, int]]:
    """The scale rows (or columns) that go with the weight's `ranges` along a dimension of `size` cut in
    blocks of `block`: each range must start on a block boundary and end on one (or at the end)."""
    out = []
    for a, b in ranges:
        if a % block or (b % block and b != size):
            raise ValueError(f"{name}: the tensor-parallel cut [{a}, {b}) of {size} falls inside a "
                             f"{block}-wide FP8 scale block; choose a tp whose cuts fall on block boundaries")
        out.append((a // block, -(-b // block)))
    return out


def scale_cut(model, weight_name: str, tp: int, rank: int, block: tuple[int, int]):
    """(dim, ranges) of the scale of `weight_name` that `rank` keeps: the weight's shard rule in block units
    (tp_policy.SHARD_TABLE; segmented cuts per segment). dim None: the whole scale."""
    from .tp_policy import full_weight_shape, gdn_segments, rule_for, shard_ranges

    rule = rule_for(weight_name)
    if rule is None or rule.dim is None or tp == 1:
        return None, None
    size = full_weight_shape(model, weight_name)[rule.dim]
    segments = gdn_segments(model.config.text_config) if rule.segmented else None
    return rule.dim, scale_ranges(shard_ranges(size, tp, rank, segments), size, block[rule.dim], weight_name)


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    """weight [out, in] e4m3 x its block scales [ceil(out/b0), ceil(in/b1)] -> [out, in] in dtype (in float32 first)."""
    rows, cols = weight.shape
    scale = scale_inv.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def fp8_matmul(module, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T with the layer's FP8 weight: the block-scaled GEMM where the probe chose it, else the reference."""
    return matmul(x, module.weight, module.weight_scale_inv, module.fp8_block, module.fp8_gemm)


def matmul(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
           gemm: bool) -> torch.Tensor:
    """x @ weight^T for an FP8 weight and its block scales (a layer's, or a fused group's): steps of up to 16
    rows (decode, verify) through the W8A16 kernel where its probe passed, whether or not the block-scaled GEMM
    did (a card without cuBLASLt's 128 x 128 recipe -- Blackwell's are MXFP8 -- still decodes from FP8 bytes);
    more rows through the GEMM (`gemm`: its probe passed and the shape fits), else the weight dequantized."""
    if CHOSEN.w8a16 and block == (GEMM_BLOCK, GEMM_BLOCK) and x.numel() <= fp8_linear.W8A16_MAX_ROWS * x.shape[-1]:
        k = x.shape[-1]
        return fp8_linear.w8a16_matmul(x.reshape(-1, k).contiguous(), weight, scale_inv).view(*x.shape[:-1], -1)
    if gemm:
        return scaled_gemm(x, weight, scale_inv)
    return torch.matmul(x, dequantize(weight, scale_inv, block, x.dtype).transpose(-1, -2))


GEMM_BLOCK = 128  # the block-scaled GEMM's recipes: 1 x 128 activations, 128 x 128 weights


def quantize_activation(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, K / 128]), one scale per token and 128 columns, the scales
    token-major (stride (1, M)) as cuBLASLt wants them. The reference of kernels/fp8_linear.quantize_activation,
    which CUDA runs (one kernel for these six ops)."""
    m, k = x2d.shape
    groups = x2d.float().view(m, k // GEMM_BLOCK, GEMM_BLOCK)
    scale = (groups.abs().amax(-1) / 448.0).clamp(min=1e-12)
    return (groups / scale[..., None]).to(FP8).view(m, k), scale.t().contiguous().t()


# PyTorch's block-scaled FP8 matmuls, newest API first: the probe keeps the first that runs and matches the
# reference on this device and torch build (torch.nn.functional.scaled_mm from 2.10; before it torch._scaled_mm,
# which infers the block-wise recipe from the scales' shapes on CUDA 12.9+). Both are cuBLASLt's kernels.
def _scaled_mm_v2(a, w, a_scale, w_scale, dtype):
    import torch.nn.functional as F

    return F.scaled_mm(a, w.t(), a_scale, F.ScalingType.BlockWise1x128, w_scale.t(), F.ScalingType.BlockWise128x128,
                       output_dtype=dtype)


def _scaled_mm_v1(a, w, a_scale, w_scale, dtype):
    return torch._scaled_mm(a, w.t(), scale_a=a_scale, scale_b=w_scale.t(), out_dtype=dtype)


GEMMS = {"torch.nn.functional.scaled_mm": _scaled_mm_v2, "torch._scaled_mm": _scaled_mm_v1}
# What probe_gemm chose for this process's device (every rank probes the same kind of card, and use_gemm makes
# the ranks agree): the block-scaled GEMM, and whether steps of few rows take kernels/fp8_linear.w8a16_matmul.
CHOSEN = SimpleNamespace(gemm=_scaled_mm_v2, w8a16=False)


def scaled_gemm(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, impl=None) -> torch.Tensor:
    """x [..., K] @ weight^T on CUDA: the activation quantized (one kernel) and the block-scaled GEMM (`impl`, or
    the one the probe chose). cuBLASLt wants the token count a multiple of 4 (zero rows are added and dropped)
    and mat_b column-major (the weight's transpose is)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, k).contiguous()
    m = x2d.shape[0]
    if m % 4:
        x2d = torch.nn.functional.pad(x2d, (0, 0, 0, -m % 4))
    a, a_scale = fp8_linear.quantize_activation(x2d)
    out = (impl or CHOSEN.gemm)(a, weight, a_scale, scale_inv, x.dtype)
    return out[:m].view(*lead, weight.shape[0])


def gemm_fits(module) -> bool:
    """Shapes the block-scaled GEMM takes: 128 x 128 blocks, whole blocks, K blocks a multiple of 4."""
    n, k = module.weight.shape
    return module.fp8_block == (GEMM_BLOCK, GEMM_BLOCK) and n % GEMM_BLOCK == 0 and k % (4 * GEMM_BLOCK) == 0


@torch.no_grad()
def probe_gemm(device: torch.device, dtype: torch.dtype) -> tuple[str | None, str | None]:
    """(why no block-scaled GEMM serves here, why the W8A16 kernel does not): None where one runs on this device
    and matches the reference path on the same operands (within bf16 rounding). The GEMM: the first of GEMMS
    that does (CHOSEN.gemm). The activation quantization kernel is checked with the GEMM; the W8A16 kernel on its
    own (a card may have one and not the other)."""
    if device.type != "cuda":
        return "not a CUDA device", "not a CUDA device"
    if fp8_linear.triton is None:
        return "Triton is not installed", "Triton is not installed"
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(384, 1024, device=device, generator=g)
    scale = w.view(3, 128, 8, 128).abs().amax(dim=(1, 3)) / 448.0
    wq = (w.view(3, 128, 8, 128) / scale[:, None, :, None]).view(384, 1024).to(FP8)
    w_ref = dequantize(wq, scale, (128, 128), torch.float32)

    def rel(got, want):
        return float((got.float() - want).norm() / want.norm())

    why, why_gemm = [], None
    for rows in (6, 40):  # few rows and many: both go through the GEMM where W8A16 does not serve
        x = torch.randn(rows, 1024, device=device, generator=g).to(dtype)
        a, a_scale = quantize_activation(x)
        want = (a.float() * a_scale.repeat_interleave(GEMM_BLOCK, 1)) @ w_ref.T
        for name, impl in GEMMS.items():
            try:
                err = rel(scaled_gemm(x, wq, scale, impl), want)
            except Exception as e:  # noqa: BLE001 -- an op this torch build or device lacks: the next, or none
                why.append(f"{name}: {type(e).__name__}: {str(e)[:160]}")
                continue
            if err < 2e-2:
                CHOSEN.gemm = impl
                break
            why.append(f"{name}: relative error {err:.3g} against the reference")
        else:
            why_gemm = "; ".join(why)
            break
    x = torch.randn(6, 1024, device=device, generator=g).to(dtype)
    try:
        err = rel(fp8_linear.w8a16_matmul(x, wq, scale), x.float() @ dequantize(wq, scale, (128, 128), dtype).float().T)
    except Exception as e:  # noqa: BLE001 -- Triton without e4m3 on this device: steps take the GEMM (or dequantize)
        return why_gemm, f"{type(e).__name__}: {str(e)[:160]}"
    return why_gemm, None if err < 1e-2 else f"relative error {err:.3g} against the reference"


class Fp8Linear(nn.Linear):
    """An unsharded linear (tp=1) with an FP8 weight."""

    def forward(self, x):
        out = fp8_matmul(self, x)
        return out + self.bias if self.bias is not None else out


def _deepspeed_classes() -> dict[type, type]:
    """DeepSpeed's column- and row-parallel layers -> their FP8 forms (their collectives kept)."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, RowParallel

    class Fp8LinearLayer(LinearLayer):
        """Column-parallel: this rank's output features; its input is replicated (nothing to gather)."""

        def forward(self, x):
            out = fp8_matmul(self, x)
            return out + self.bias if self.bias is not None else out

    class Fp8LinearAllreduce(LinearAllreduce):
        """Row-parallel: this rank's input features, the partial outputs all-reduced (as LinearAllreduce)."""

        def forward(self, x):
            out = RowParallel.apply(self.mp_group, fp8_matmul(self, x), True)
            return out + self.bias if self.bias is not None else out

    return {nn.Linear: Fp8Linear, LinearLayer: Fp8LinearLayer, LinearAllreduce: Fp8LinearAllreduce}


def converted_linears(model, fmt: Fp8Format) -> dict[str, nn.Module]:
    """The language model's (and MTP head's) linears the format stores in FP8, by checkpoint module name."""
    from .tp_policy import is_language_model

    out = {}
    for name, module in model.named_modules():
        if is_language_model(name + ".") and isinstance(module, (nn.Linear, *_linear_bases())) \
                and not name.startswith("lm_head") and fmt.converts(name):
            out[name] = module
    return out


def _linear_bases() -> tuple[type, ...]:
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    return (LinearAllreduce, LinearLayer)


@torch.no_grad()
def convert(model, fmt: Fp8Format, tp: int) -> list[str]:
    """Give every converted linear of a sharded model (tp_policy.apply_tensor_parallel done) an FP8 weight of its
    shard's shape and the scale that goes with it, and the class that computes with them. The values are
    the loader's to fill. A fused projection group (tp_policy.FUSED_PROJECTIONS) whose members are all
    converted is fused again in FP8 (`fuse_fp8`: one GEMM, one activation quantization); one with unconverted
    members too (the GDN's in_proj_b / in_proj_a stay bf16) runs its members one by one. Returns the converted
    module names."""
    from .tp_policy import FUSED_PROJECTIONS, FUSED_SPLITS, FUSED_WEIGHT, decoder_layers

    classes = _deepspeed_classes()
    names = converted_linears(model, fmt)
    for name in names:  # every rank's cut on block boundaries, before anything is allocated in FP8
        for rank in range(tp):
            scale_cut(model, name + ".weight", tp, rank, fmt.block)
    converted = set(map(id, names.values()))
    for layer in decoder_layers(model):
        for kind, members in FUSED_PROJECTIONS.items():
            parent = getattr(layer, kind, None)
            if parent is None or getattr(parent, FUSED_WEIGHT, None) is None:
                continue
            if any(id(getattr(parent, m)) in converted for m in members):
                for m in members:  # an unconverted member its own storage again, with its values (a converted
                    lin = getattr(parent, m)  # one gets a new FP8 weight below): the fused bf16 storage goes
                    if id(lin) not in converted:
                        lin.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
                delattr(parent, FUSED_WEIGHT)
                delattr(parent, FUSED_SPLITS)
    for name, module in names.items():
        cls = next((fp8 for base, fp8 in classes.items() if type(module) is base), None)
        if cls is None:
            raise TypeError(f"{name}: an FP8 weight in a {type(module).__name__}, which has no FP8 form here")
        w = module.weight
        module.weight = nn.Parameter(torch.empty(w.shape, dtype=FP8, device=w.device), requires_grad=False)
        module.weight_scale_inv = nn.Parameter(
            torch.empty(scale_shape(w.shape, fmt.block), dtype=torch.float32, device=w.device), requires_grad=False)
        module.fp8_block = fmt.block
        module.fp8_gemm = False  # use_gemm decides, once the device is known
        module.__class__ = cls
    fused = []
    for layer in decoder_layers(model):
        for kind, members in FUSED_PROJECTIONS.items():
            parent = getattr(layer, kind, None)
            if parent is not None and all(id(getattr(parent, m)) in converted for m in members):
                if fuse_fp8(parent, [getattr(parent, m) for m in members], fmt.block):
                    fused.append(parent)
    if any(p.is_cuda for p in model.parameters()):
        torch.cuda.empty_cache()  # the bf16 shards DeepSpeed allocated for these layers
    use_gemm(model, names, fused)
    return sorted(names)


def fuse_fp8(parent, linears: list[nn.Module], block: tuple[int, int]) -> bool:
    """One FP8 weight and one scale for `linears` (same input, each a whole number of scale blocks of rows):
    each member's weight and scale become views of their rows, so the loader's reads land in the fused ones
    (as tp_policy.fuse_projections does in bf16). False: a member's rows end inside a block (left alone)."""
    from .tp_policy import FUSED_SCALE, FUSED_SPLITS, FUSED_WEIGHT

    rows = [lin.weight.shape[0] for lin in linears]
    if any(r % block[0] for r in rows) or len({lin.weight.shape[1] for lin in linears}) != 1:
        return False
    device, k = linears[0].weight.device, linears[0].weight.shape[1]
    weight = torch.empty((sum(rows), k), dtype=FP8, device=device)
    scale = torch.empty(scale_shape(weight.shape, block), dtype=torch.float32, device=device)
    at = 0
    for lin, r in zip(linears, rows):
        lin.weight.data = weight[at:at + r]
        lin.weight_scale_inv.data = scale[at // block[0]:(at + r) // block[0]]
        at += r
    setattr(parent, FUSED_WEIGHT, weight)
    setattr(parent, FUSED_SPLITS, tuple(rows))
    setattr(parent, FUSED_SCALE, scale)
    parent.fp8_block, parent.fp8_gemm = block, False
    return True


def use_gemm(model, names: dict[str, nn.Module], fused: list[nn.Module] = ()) -> None:
    """The block-scaled GEMM for every converted layer (and fused group) whose shape it takes, where the probe
    passes on every rank (the same arithmetic on all ranks; the choice changes no collective)."""
    from .model import agree, log

    if not names:
        return
    weight = next(iter(names.values())).weight
    device = weight.device
    dtype = next(p for p in model.parameters() if p.dtype != FP8 and p.is_floating_point()).dtype
    why, why_w8a16 = probe_gemm(device, dtype)
    ok = agree(why is None, device)
    CHOSEN.w8a16 = agree(why_w8a16 is None and dtype in (torch.bfloat16, torch.float16), device)
    fits = [m for m in names.values() if gemm_fits(m)]
    for m in fits:
        m.fp8_gemm = ok
    from .tp_policy import FUSED_WEIGHT
    for parent in fused:
        parent.fp8_gemm = ok and gemm_fits(SimpleNamespace(weight=getattr(parent, FUSED_WEIGHT),
                                                           fp8_block=parent.fp8_block))
    if device.type == "cuda":
        gemm = next(n for n, f in GEMMS.items() if f is CHOSEN.gemm)
        log(f"FP8 linears: {len(fits) if ok else 0} of {len(names)} through the block-scaled GEMM ({gemm})"
            + ("" if ok else f" (the probe: {why or 'another rank failed it'}); the rest dequantize")
            + ("; steps of up to 16 rows through the W8A16 kernel" if CHOSEN.w8a16 else
               f"; the W8A16 kernel not used ({why_w8a16 or 'another rank failed it'})"))
