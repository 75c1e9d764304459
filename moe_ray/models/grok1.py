"""Grok-1 (314B) decoder layer, as in the HF safetensors port of xAI's JAX release.

What differs from a llama/Mixtral layer:
- four RMSNorms whose weight is called `scale`: attention's and the MoE block's outputs are normed
  again (`post_attn_norm`, `post_moe_norm`) before the residual add;
- attention logits are q·k × `attn_output_multiplier` (no 1/sqrt(head_dim)), then soft-capped
  `max_attn_value`·tanh(x / `max_attn_value`) (30) before the softmax;
- experts are GELU-gated (`linear` = W_gate, `linear_v` = W_up, `linear_1` = W_down);
- routing: softmax over all 8 logits, the top-2 probabilities, no renormalisation.
The embedding multiplier lives in the family adapter (`embedding_scale`): it acts on the embeddings.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, MixtralConfig
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as softcapped_attention
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from ..checkpoint.families.base import softmax_then_topk

Config = LlamaConfig  # grok's extra fields (multipliers, caps, num_experts) ride along as attributes
RotaryEmbedding = LlamaRotaryEmbedding


class RMSNorm(nn.Module):
    """RMS norm with its weight named `scale` (the hub's name); y = scale · x / rms(x)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.scale * normed).to(x.dtype)


def fused_experts(config: LlamaConfig, num_experts: int, d_mid: int, act: str) -> nn.Module:
    """transformers' fused expert stack (`gate_up_proj` [E, 2·d_mid, H], `down_proj` [E, H, d_mid])."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    shim = MixtralConfig(num_local_experts=num_experts, hidden_size=config.hidden_size,
                         intermediate_size=d_mid, hidden_act=act)
    shim._experts_implementation = "eager"
    return MixtralExperts(shim)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        h, self.head_dim = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = float(config.attn_output_multiplier)
        self.softcap = float(config.max_attn_value)
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        out, _ = softcapped_attention(self, q, k, v, _additive(attention_mask, T, x.dtype),
                                      scaling=self.scaling, softcap=self.softcap)
        return self.o_proj(out.reshape(B, T, -1))


def _additive(mask: torch.Tensor | None, T: int, dtype: torch.dtype) -> torch.Tensor:
    """The causal mask as additive logits (0 where attended, -inf-like where not)."""
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool).tril()
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


class MoeBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = fused_experts(config, config.num_experts, config.intermediate_size, "gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = softmax_then_topk(self.gate(x), self.top_k, renormalize=False)
        return self.experts(x, experts, weights.to(x.dtype)).reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.attn = Attention(config, layer_idx)
        self.mlp = MoeBlock(config)  # the hub calls it `moe_block` (the adapter's moe_hub_name)
        self.pre_attn_norm, self.post_attn_norm = RMSNorm(config.hidden_size, eps), RMSNorm(config.hidden_size, eps)
        self.pre_moe_norm, self.post_moe_norm = RMSNorm(config.hidden_size, eps), RMSNorm(config.hidden_size, eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        attn = self.attn(self.pre_attn_norm(hidden_states), position_embeddings, attention_mask)
        hidden_states = hidden_states + self.post_attn_norm(attn)
        moe = self.mlp(self.pre_moe_norm(hidden_states))
        return hidden_states + self.post_moe_norm(moe)
