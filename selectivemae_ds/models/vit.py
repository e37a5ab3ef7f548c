"""ViT encoder on timm blocks, with weights that map one-to-one onto timm's ViTs.

`ViTEncoder.state_dict()` has exactly the keys and shapes of
`timm.create_model("vit_<size>_patch16_224", num_classes=0, img_size=...)`
(`vit_huge_patch14_224` for huge): `cls_token`, `pos_embed`,
`patch_embed.proj.*`, `blocks.<i>.*`, `norm.*`. The position table is the fixed
2-D sin-cos table of MAE, stored as a persistent buffer so that it is saved and
exported but never trained or weight-decayed.

Attention is timm's `Attention` (torch SDPA). With `attn_impl="flash"` the
blocks use `FlashSelfAttention`, a subclass with the same parameters that calls
flash-attn for bf16/fp16 CUDA activations.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .config import ENCODER_PRESETS
from .patches import gather_tokens


def flash_attn_available() -> bool:
    """True when the `flash_attn` package can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


def require_flash_attn() -> Callable[..., Tensor]:
    """Return `flash_attn.flash_attn_func`, or raise a clear error when it is missing."""
    if not flash_attn_available():
        raise ImportError(
            "model.attn_impl: 'flash' needs the flash-attn package, which is not installed "
            "(pip install 'selectivemae-ds[flash]', or set model.attn_impl = \"sdpa\")"
        )
    from flash_attn import flash_attn_func

    return flash_attn_func


def use_flash_kernel(x: Tensor) -> bool:
    """flash-attn only runs half-precision CUDA tensors; fp32 (no autocast) stays on SDPA."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """MAE's 1-D sin-cos embedding. pos: (M,) -> (M, dim) laid out [sin | cos]."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d_table(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """MAE's 2-D sin-cos position table: (1, [1 +] grid*grid, dim), float32.

    Patches are numbered row-major (index = row * grid + col), as in
    `patch_embed(...).flatten(2)`. Like MAE's `get_2d_sincos_pos_embed`, the
    first half of the width encodes the column and the second half the row, so
    MAE checkpoints line up; the cls row is zero.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position table needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)
    return table.to(torch.float32).unsqueeze(0)


class FlashSelfAttention(Attention):
    """timm `Attention` (same parameters and keys) that calls flash-attn when it can.

    flash-attn is used for half-precision CUDA activations, i.e. under the
    caller's bf16/fp16 autocast; fp32 activations fall back to timm's SDPA path
    because flash-attn has no fp32 kernel.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flash = require_flash_attn()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x: (B, L, C) -> (B, L, C)."""
        if attn_mask is not None or self.gate is not None or not use_flash_kernel(x):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # flash-attn takes (B, L, H, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        drop = self.attn_drop.p if self.training else 0.0
        out = self._flash(q, k, v, dropout_p=drop, causal=is_causal)
        out = self.norm(out.reshape(b, n, self.attn_dim))
        return self.proj_drop(self.proj(out))


def init_mae_weights(module: nn.Module) -> None:
    """MAE init: xavier-uniform linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTEncoder(nn.Module):
    """ViT encoder (cls token, fixed 2-D sin-cos positions, pre-norm timm blocks).

    Three entry points:
    - `embed_patches(imgs)`: (B, 3, H, W) -> (B, N, D) patch embeddings
      (no position), which PSTS also uses for its cosine similarities;
    - `forward_visible(patches, visible_idx)`: encode only the chosen patches;
    - `forward_features(imgs)`: all patches, for evaluation, identical to
      timm's `VisionTransformer.forward_features` with the same weights.
    """

    def __init__(
        self,
        size: str,
        img_size: int = 224,
        patch_size: int | None = None,
        attn_impl: str = "sdpa",
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        embed_dim, depth, num_heads, default_patch = ENCODER_PRESETS[size]
        patch = default_patch if patch_size is None else patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.patch_size = patch
        self.grid = img_size // patch
        self.num_patches = self.grid * self.grid

        # timm's PatchEmbed: a stride-p conv, flattened to (B, N, D), key `patch_embed.proj`.
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch, in_chans=3, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Persistent buffer: in the state dict (so timm's `pos_embed` loads from it)
        # but not a parameter, hence never updated nor weight-decayed.
        self.register_buffer("pos_embed", sincos_2d_table(embed_dim, self.grid, cls_token=True), persistent=True)
        attn_layer = FlashSelfAttention if attn_impl == "flash" else Attention
        if attn_impl == "flash":
            require_flash_attn()
        # Linearly increasing stochastic depth (in Python: also works on the meta device).
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        # timm's defaults for vit_*_patch16_224: qkv bias, mlp ratio 4, GELU, LayerNorm eps 1e-6.
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=4.0,
                    qkv_bias=True,
                    drop_path=rates[i],
                    norm_layer=_layer_norm_1e6,
                    attn_layer=attn_layer,
                )
                for i in range(depth)
            ]
        )
        self.norm = _layer_norm_1e6(embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE init: patch conv as a linear layer (xavier), cls ~ N(0, 0.02), MAE linear init."""
        self.apply(init_mae_weights)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def embed_patches(self, imgs: Tensor) -> Tensor:
        """imgs: (B, 3, H, W) -> (B, N, D) patch embeddings without position."""
        return self.patch_embed(imgs)

    def forward_visible(self, patches: Tensor, visible_idx: Tensor) -> Tensor:
        """Encode a subset of patches.

        patches: (B, N, D) from `embed_patches`; visible_idx: (B, V) int64.
        Returns (B, 1 + V, D): cls token first, then the V encoded patches in
        the order of `visible_idx`, after the final norm.
        """
        return self.norm(self.blocks(self._visible_tokens(patches, visible_idx)))

    def forward_visible_layers(self, patches: Tensor, visible_idx: Tensor, with_input: bool) -> Tensor:
        """Encode a subset of patches and keep every block's output (CrossMAE's feature maps).

        Returns (B, 1 + V, D, K) stacked along the last dim: the input tokens (cls +
        positioned patches) when `with_input`, then the output of each block, the last
        one after the final norm (K = depth + with_input). CrossMAE feeds its decoder
        the last block without the final norm; applying it keeps the norm trained,
        which the exported encoder uses.
        """
        x = self._visible_tokens(patches, visible_idx)
        layers = [x] if with_input else []
        for i, block in enumerate(self.blocks):
            x = block(x)
            layers.append(self.norm(x) if i == self.depth - 1 else x)
        return torch.stack(layers, dim=-1)

    def _visible_tokens(self, patches: Tensor, visible_idx: Tensor) -> Tensor:
        """(B, N, D) embeddings -> (B, 1 + V, D): cls, then the chosen patches, with positions."""
        b = patches.shape[0]
        # Position first, then gather: the kept tokens carry their own positions.
        x = gather_tokens(patches + self.pos_embed[:, 1:, :].to(patches.dtype), visible_idx)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(b, -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1)

    def forward_all(self, patches: Tensor) -> Tensor:
        """Encode the whole sequence: (B, N, D) embeddings (some may be mask tokens, as
        SimMIM/CtxMIM feed) -> (B, 1 + N, D), cls first, after the final norm."""
        cls = self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        x = torch.cat([cls, patches], dim=1) + self.pos_embed.to(patches.dtype)
        return self.norm(self.blocks(x))

    def forward_features(self, imgs: Tensor) -> Tensor:
        """All patches, unmasked: (B, 3, H, W) -> (B, 1 + N, D) (timm's forward_features)."""
        return self.forward_all(self.embed_patches(imgs))


def _layer_norm_1e6(dim: int, **kwargs: Any) -> nn.LayerNorm:
    """LayerNorm with eps 1e-6, the epsilon of timm's and MAE's ViTs."""
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


def attention(q: Tensor, k: Tensor, v: Tensor, use_flash: bool, dropout_p: float = 0.0) -> Tensor:
    """Multi-head attention on (B, H, L, Dh) tensors, returning (B, H, Lq, Dh).

    `use_flash` picks flash-attn (half-precision CUDA only; the layout is
    transposed to its (B, L, H, Dh)); otherwise torch SDPA, which itself
    dispatches to flash/memory-efficient kernels where it can.
    """
    if use_flash and use_flash_kernel(q):
        flash = require_flash_attn()
        out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
