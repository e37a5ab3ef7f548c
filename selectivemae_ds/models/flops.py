"""Analytic training FLOPs per image, for throughput and MFU.

Counting rule (the usual one for MFU, e.g. PaLM/Megatron):
- forward FLOPs = 2 x multiply-accumulates of every matmul the model runs:
  the patch-embedding conv (on all N patches: PSTS needs every embedding),
  linear layers (qkv/q/kv/out projections, MLPs, decoder embedding, pixel
  head) and the two attention matmuls (scores Q.K^T and weights.V);
- training FLOPs = 3 x forward (the backward pass costs two forwards);
- not counted: LayerNorm, softmax, GELU, residual adds, the HOG scores and
  PSTS selection, the loss, the optimizer. They are memory-bound and small;
  leaving them out makes MFU slightly conservative.
Each method's spec counts its own step (`MethodSpec.forward_flops`) from the
block counts below; token counts follow the implementation: the encoder sees
1 + V tokens (cls + visible), a cross-attention decoder runs T queries over
1 + V memory tokens, MAE's decoder runs 1 + N tokens and its head only the T targets.
"""
from __future__ import annotations

from typing import Any

from .config import ModelConfig


def encoder_forward_flops(dim: int, depth: int, tokens: int) -> float:
    """Forward FLOPs of `depth` pre-norm ViT blocks (mlp ratio 4) on `tokens` tokens."""
    linear = 2.0 * tokens * (3 * dim * dim + dim * dim + 8 * dim * dim)  # qkv, proj, fc1+fc2
    attn = 2.0 * 2.0 * tokens * tokens * dim  # Q.K^T and A.V
    return depth * (linear + attn)


def cross_decoder_forward_flops(dim: int, depth: int, queries: int, memory: int, self_attn: bool) -> float:
    """Forward FLOPs of `depth` cross-attention blocks: `queries` over `memory` tokens."""
    per_block = (
        2.0 * queries * dim * dim  # q projection
        + 2.0 * memory * dim * 2 * dim  # k, v projections of the memory
        + 2.0 * 2.0 * queries * memory * dim  # Q.K^T and A.V
        + 2.0 * queries * dim * dim  # output projection
        + 2.0 * queries * 8 * dim * dim  # MLP
    )
    if self_attn:
        per_block += 2.0 * queries * 4 * dim * dim + 2.0 * 2.0 * queries * queries * dim
    return depth * per_block


def forward_flops_per_image(model_cfg: ModelConfig, method_cfg: Any = None) -> float:
    """Forward matmul FLOPs for one image: the method spec's count (rule in the module docstring).

    method_cfg: the method's config (None = its defaults).
    """
    from .methods import get_spec

    spec = get_spec(model_cfg.method)
    return spec.forward_flops(spec.default_config() if method_cfg is None else method_cfg, model_cfg)


def flops_per_image(model_cfg: ModelConfig, method_cfg: Any = None) -> float:
    """Training FLOPs per image: 3 x `forward_flops_per_image` (fwd + bwd)."""
    return 3.0 * forward_flops_per_image(model_cfg, method_cfg)
