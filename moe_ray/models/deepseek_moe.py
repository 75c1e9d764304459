"""DeepSeekMoE v1 (16B) decoder layer: a llama layer whose MLP, on MoE layers, is 64 fine-grained
routed experts plus shared experts fused into one wider MLP ("SE"), added unweighted.

Routing: softmax over all routed experts, then the top-k probabilities, not renormalised unless
`norm_topk_prob`. Which layers are MoE (dense first layer, `moe_layer_freq`) is the family
adapter's rule; it hands the list over as `config.moe_layers`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP, LlamaRotaryEmbedding

from ..checkpoint.families.base import softmax_then_topk
from .grok1 import fused_experts

Config = LlamaConfig  # n_routed_experts, moe_intermediate_size, … ride along as attributes
RotaryEmbedding = LlamaRotaryEmbedding


class MoeBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.renormalize = bool(getattr(config, "norm_topk_prob", False))
        self.gate = nn.Linear(config.hidden_size, config.n_routed_experts, bias=False)
        self.experts = fused_experts(config, config.n_routed_experts, config.moe_intermediate_size, config.hidden_act)
        self.shared_experts = None
        if getattr(config, "n_shared_experts", None):
            shared = copy.copy(config)
            shared.intermediate_size = config.moe_intermediate_size * config.n_shared_experts
            self.shared_experts = LlamaMLP(shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = softmax_then_topk(self.gate(x), self.top_k, renormalize=self.renormalize)
        out = self.experts(x, experts, weights.to(x.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


class DecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if layer_idx in config.moe_layers:
            self.mlp = MoeBlock(config)
