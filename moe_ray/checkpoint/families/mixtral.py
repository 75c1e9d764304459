"""Mixtral (8x7B, 8x22B): `block_sparse_moe` with experts w1 (gate), w3 (up), w2 (down)."""
from __future__ import annotations

from ...lazy import torch  # imported on first use (moe-ray plan needs none)

from .base import Family, llama_model_shapes, llama_tiny_base


class Mixtral(Family):
    name = "mixtral"
    architectures = ("MixtralForCausalLM",)
    model_types = ("mixtral",)
    key_marker = ".block_sparse_moe.experts."
    router_key = "model.layers.{layer}.block_sparse_moe.gate.weight"
    expert_key = "model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight"
    expert_proj = {"up": "w3", "gate": "w1", "down": "w2"}
    activation = "silu"
    routing = "top-k of the router logits, softmax over the k chosen"
    hf_module = "mixtral"
    hf_prefix = "Mixtral"
    moe_hub_name = "block_sparse_moe"

    @classmethod
    def expert_d_mid(cls, config: dict) -> int:
        return int(config["intermediate_size"])

    @classmethod
    def topk_renormalized(cls, config: dict) -> bool:
        return True  # a softmax over the chosen logits

    @classmethod
    def tensor_shapes(cls, config: dict) -> dict[str, tuple[int, ...]]:
        return llama_model_shapes(cls, config)

    @classmethod
    def tiny_config(cls) -> dict:
        return llama_tiny_base(
            architectures=["MixtralForCausalLM"], model_type="mixtral",
            num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
            sliding_window=None,
        )

    flavors = {
        "8x7B": llama_tiny_base(
            architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
            intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=32768,
            rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
        # mistralai/Mixtral-8x22B-v0.1 (tests/data/configs); the Instruct model's vocabulary is 32,768
        "8x22B": llama_tiny_base(
            architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=6144,
            intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
            num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=65536,
            rope_theta=1e6, rms_norm_eps=1e-5, num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
    }
