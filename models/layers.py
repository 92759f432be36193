"""Transformer blocks shared by the prior and the decoder: pre-LN self-attention, MLP, timestep embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: t [B] -> [B, dim], cos half then sin half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2 * half]
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # [B, dim]
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the timestep followed by a two-layer MLP (as in DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] (integer or float timesteps) -> [B, dim]."""
        freqs = timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype)  # [B, freq_dim]
        return self.mlp(freqs)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention` (flash/memory-efficient kernels)."""

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim {dim} is not divisible by heads {heads}; give head_dim explicitly")
            head_dim = dim // heads
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, dim]; attn_mask [B, 1, S, S] bool (True = may attend) or additive float, or None."""
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.heads, self.head_dim)  # [B, S, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, S, Dh]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # [B, H, S, Dh]
        y = y.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)  # [B, S, H * Dh]
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(
        self, dim: int, heads: int, head_dim: int | None = None, ff_mult: int = 4, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, head_dim, dropout)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, ff_mult * dim, dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, dim] -> [B, S, dim]; attn_mask as in `SelfAttention.forward`."""
        x = x + self.attn(self.ln_attn(x), attn_mask)
        return x + self.mlp(self.ln_mlp(x))


def causal_padding_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B, 1, S, S] from key_valid [B, S] (True = real token).

    Query i may attend key j when j <= i and key j is real. Every token may attend itself, so a padded query
    whose earlier keys are all padding still has one key and yields no NaN; no real token ever attends a
    padded one, so real outputs do not depend on how much padding there is.
    """
    s = key_valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=key_valid.device).tril()  # [S, S]
    eye = torch.eye(s, dtype=torch.bool, device=key_valid.device)  # [S, S]
    return (causal & key_valid[:, None, None, :]) | eye  # [B, 1, S, S]
