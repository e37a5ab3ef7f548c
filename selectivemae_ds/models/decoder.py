"""Decoders: cross-attention (SelectiveMAE, CrossMAE) and self-attention (MAE).

Both share one interface: `forward(latent, visible_idx, target_idx)` with
latent: (B, 1 + V, De) encoder output (cls first), visible_idx: (B, V),
target_idx: (B, T), returning predictions (B, T, p*p*3) for the target patches
in `target_idx` order.

Cross-attention decoder: the queries are the mask token plus the decoder
position embedding of each patch to reconstruct; keys/values are the projected
encoder tokens (with their decoder positions). Its cost grows with T and V only,
never with N, which is where SelectiveMAE's speed comes from.
"""
from __future__ import annotations

import torch
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .patches import gather_tokens
from .vit import FlashSelfAttention, _layer_norm_1e6, attention, init_mae_weights, require_flash_attn, sincos_2d_table


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, Q, C) over a memory (B, M, C)."""

    def __init__(self, dim: int, num_heads: int, use_flash: bool = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.use_flash = use_flash
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, 2 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        """x: (B, Q, C), memory: (B, M, C) -> (B, Q, C)."""
        b, nq, c = x.shape
        nm = memory.shape[1]
        q = self.q(x).reshape(b, nq, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(memory).reshape(b, nm, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        out = attention(q, k, v, use_flash=self.use_flash)
        return self.proj(out.transpose(1, 2).reshape(b, nq, c))


class CrossAttentionBlock(nn.Module):
    """Pre-norm decoder block: [self-attention] -> cross-attention -> MLP.

    The memory gets its own LayerNorm in every block (as CrossMAE), so each
    block can rescale the encoder tokens it reads.
    """

    def __init__(self, dim: int, num_heads: int, self_attn: bool = False, use_flash: bool = False) -> None:
        super().__init__()
        if self_attn:
            self.norm0: nn.Module | None = _layer_norm_1e6(dim)
            attn_cls = FlashSelfAttention if use_flash else Attention
            self.self_attn: nn.Module | None = attn_cls(dim, num_heads=num_heads, qkv_bias=True)
        else:
            self.norm0 = None
            self.self_attn = None
        self.norm1 = _layer_norm_1e6(dim)
        self.norm_mem = _layer_norm_1e6(dim)
        self.cross_attn = CrossAttention(dim, num_heads, use_flash=use_flash)
        self.norm2 = _layer_norm_1e6(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=4 * dim, act_layer=nn.GELU)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        """x: (B, Q, C) queries, memory: (B, M, C) -> (B, Q, C)."""
        if self.self_attn is not None and self.norm0 is not None:
            x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), self.norm_mem(memory))
        return x + self.mlp(self.norm2(x))


class _DecoderBase(nn.Module):
    """Shared parts: encoder->decoder projection, mask token, fixed positions, head."""

    def __init__(self, encoder_dim: int, dim: int, grid: int, patch_size: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_patches = grid * grid
        self.decoder_embed = nn.Linear(encoder_dim, dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed sin-cos table (cls row first), a buffer: saved, never trained.
        self.register_buffer("pos_embed", sincos_2d_table(dim, grid, cls_token=True), persistent=True)
        self.norm = _layer_norm_1e6(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3, bias=True)

    def reset_parameters(self) -> None:
        """MAE init: xavier-uniform linears, mask token ~ N(0, 0.02)."""
        self.apply(init_mae_weights)
        nn.init.normal_(self.mask_token, std=0.02)


class CrossAttentionDecoder(_DecoderBase):
    """Queries = mask token + positions of the targets; keys/values = encoder tokens."""

    def __init__(
        self,
        encoder_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        grid: int,
        patch_size: int,
        self_attn: bool = False,
        attn_impl: str = "sdpa",
        fuse_layers: int = 0,
    ) -> None:
        super().__init__(encoder_dim, dim, grid, patch_size)
        use_flash = attn_impl == "flash"
        if use_flash:
            require_flash_attn()
        self.blocks = nn.ModuleList(
            [CrossAttentionBlock(dim, num_heads, self_attn=self_attn, use_flash=use_flash) for _ in range(depth)]
        )
        # CrossMAE's feature fusion: block j reads sum_k w[j, k] * layer_k of the encoder.
        self.fuse = nn.Linear(fuse_layers, depth, bias=False) if fuse_layers > 0 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE init; the fusion weights ~ N(0, 1/K) as CrossMAE."""
        super().reset_parameters()
        if self.fuse is not None:
            nn.init.normal_(self.fuse.weight, std=self.fuse.in_features**-0.5)

    def forward(self, latent: Tensor, visible_idx: Tensor, target_idx: Tensor) -> Tensor:
        """latent: (B, 1+V, De), or (B, 1+V, De, K) encoder layers with fusion;
        visible_idx: (B, V), target_idx: (B, T) -> (B, T, p*p*3)."""
        b = latent.shape[0]
        if self.fuse is None:
            embedded = self.decoder_embed(latent)  # (B, M, C): one memory for every block
        else:
            # (B, M, De, K) -> one mix per block (B, M, depth, De) -> decoder width (B, M, depth, C).
            embedded = self.decoder_embed(self.fuse(latent).transpose(-1, -2))
        pos = self.pos_embed.to(embedded.dtype)
        patch_pos = pos[:, 1:, :].expand(b, -1, -1)
        mem_pos = torch.cat([pos[:, :1, :].expand(b, -1, -1), gather_tokens(patch_pos, visible_idx)], 1)
        if self.fuse is None:
            memories = [embedded + mem_pos] * len(self.blocks)
        else:
            memories = [embedded[:, :, j] + mem_pos for j in range(len(self.blocks))]
        x = self.mask_token.to(embedded.dtype) + gather_tokens(patch_pos, target_idx)
        for block, memory in zip(self.blocks, memories):
            x = block(x, memory)
        return self.pred(self.norm(x))


class SelfAttentionDecoder(_DecoderBase):
    """MAE's decoder: the full sequence (cls + N) with mask tokens in the holes."""

    def __init__(
        self,
        encoder_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        grid: int,
        patch_size: int,
        attn_impl: str = "sdpa",
    ) -> None:
        super().__init__(encoder_dim, dim, grid, patch_size)
        attn_layer = FlashSelfAttention if attn_impl == "flash" else Attention
        self.blocks = nn.Sequential(
            *[
                Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=_layer_norm_1e6, attn_layer=attn_layer)
                for _ in range(depth)
            ]
        )
        self.reset_parameters()

    def forward(self, latent: Tensor, visible_idx: Tensor, target_idx: Tensor) -> Tensor:
        """latent: (B, 1+V, De), visible_idx: (B, V), target_idx: (B, T) -> (B, T, p*p*3)."""
        x = self.decoder_embed(latent)
        b, _, c = x.shape
        # Put the encoded tokens back at their grid positions; mask tokens elsewhere.
        full = self.mask_token.to(x.dtype).expand(b, self.num_patches, c)
        full = full.scatter(1, visible_idx.unsqueeze(-1).expand(-1, -1, c), x[:, 1:, :])
        x = torch.cat([x[:, :1, :], full], dim=1) + self.pos_embed.to(x.dtype)
        x = self.blocks(x)
        # Only the targets' predictions enter the loss: gather before the head.
        return self.pred(self.norm(gather_tokens(x[:, 1:, :], target_idx)))
