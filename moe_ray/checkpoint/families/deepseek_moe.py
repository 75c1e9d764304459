"""DeepSeekMoE v1 (16B): 64 fine-grained routed experts, shared experts fused into one wider MLP
("SE"), dense first layer(s), softmax over all experts then top-k with no renormalisation."""
from __future__ import annotations

from ...lazy import torch  # imported on first use (moe-ray plan needs none)

from .base import Family, llama_model_shapes, mlp_as_stack, llama_tiny_base


class DeepseekMoe(Family):
    name = "deepseek_moe"
    architectures = ("DeepseekForCausalLM",)
    model_types = ("deepseek",)
    key_marker = ".mlp.shared_experts."
    router_key = "model.layers.{layer}.mlp.gate.weight"
    expert_key = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
    shared_key = "model.layers.{layer}.mlp.shared_experts.{proj}.weight"
    activation = "silu"
    own_module = "deepseek_moe"
    routing = "softmax over all experts, then top-k of the probabilities, no renormalisation"

    @classmethod
    def shared_expert_stack(cls, block):
        """The shared experts (one wider MLP, added unweighted) as a one-expert stack."""
        shared = getattr(block, "shared_experts", None)
        return None if shared is None else mlp_as_stack(shared)

    @classmethod
    def shared_expert_module(cls, block):
        return getattr(block, "shared_experts", None)

    @classmethod
    def shared_d_mid(cls, config: dict) -> int | None:
        n_shared = int(config.get("n_shared_experts") or 0)
        return n_shared * int(config["moe_intermediate_size"]) if n_shared else None

    @classmethod
    def dense_d_mid(cls, config: dict) -> int | None:
        return int(config["intermediate_size"])

    @classmethod
    def is_moe_layer(cls, config: dict, layer: int) -> bool:
        return (cls.num_experts(config) > 0
                and layer >= int(config.get("first_k_dense_replace", 0))
                and layer % int(config.get("moe_layer_freq", 1)) == 0)

    @classmethod
    def tensor_shapes(cls, config: dict) -> dict[str, tuple[int, ...]]:
        return llama_model_shapes(cls, config)

    @classmethod
    def tiny_config(cls) -> dict:
        return llama_tiny_base(
            architectures=["DeepseekForCausalLM"], model_type="deepseek",
            intermediate_size=256, moe_intermediate_size=32, n_routed_experts=64, n_shared_experts=2,
            num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, scoring_func="softmax",
            norm_topk_prob=False, aux_loss_alpha=0.001, seq_aux=True,
        )

    flavors = {
        "16B": llama_tiny_base(
            architectures=["DeepseekForCausalLM"], model_type="deepseek", hidden_size=2048,
            intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=16, head_dim=128, vocab_size=102400,
            max_position_embeddings=4096, n_routed_experts=64, n_shared_experts=2,
            num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
            scoring_func="softmax", norm_topk_prob=False, rms_norm_eps=1e-6,
            bos_token_id=100000, eos_token_id=100001),
    }
