"""Qwen2-MoE / Qwen1.5-MoE (`mlp.experts`, one gated shared expert `mlp.shared_expert`) and
Qwen3-MoE (no shared expert)."""
from __future__ import annotations

from ...lazy import torch  # imported on first use (moe-ray plan needs none)

from .base import Family, llama_model_shapes, mlp_as_stack, llama_tiny_base


class Qwen2Moe(Family):
    name = "qwen2_moe"
    architectures = ("Qwen2MoeForCausalLM",)
    model_types = ("qwen2_moe",)
    key_marker = ".mlp.shared_expert."
    router_key = "model.layers.{layer}.mlp.gate.weight"
    expert_key = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
    shared_key = "model.layers.{layer}.mlp.shared_expert.{proj}.weight"
    activation = "silu"
    routing = "softmax over all experts, then top-k (renormalised if norm_topk_prob)"
    attention_bias = True
    hf_module = "qwen2_moe"
    hf_prefix = "Qwen2Moe"

    @classmethod
    def shared_expert_stack(cls, block):
        """The shared expert (`mlp.shared_expert`, before its sigmoid gate) as a one-expert stack."""
        return mlp_as_stack(block.shared_expert)

    @classmethod
    def shared_expert_module(cls, block):
        """`mlp.shared_expert`; its output is then scaled by sigmoid(shared_expert_gate(x))."""
        return block.shared_expert

    @classmethod
    def shared_d_mid(cls, config: dict) -> int | None:
        return config.get("shared_expert_intermediate_size") or None

    @classmethod
    def dense_d_mid(cls, config: dict) -> int | None:
        return int(config["intermediate_size"])

    @classmethod
    def is_moe_layer(cls, config: dict, layer: int) -> bool:
        step = int(config.get("decoder_sparse_step", 1) or 1)
        return (layer not in (config.get("mlp_only_layers") or [])
                and cls.num_experts(config) > 0 and (layer + 1) % step == 0)

    @classmethod
    def tensor_shapes(cls, config: dict) -> dict[str, tuple[int, ...]]:
        extra = {}
        if cls.shared_d_mid(config):
            extra["model.layers.{layer}.mlp.shared_expert_gate.weight"] = (1, int(config["hidden_size"]))
        shapes = llama_model_shapes(cls, config, attn_bias=cls.attention_bias)
        facts = cls.facts(config)
        for layer in facts.moe_layers:
            shapes.update({k.format(layer=layer): s for k, s in extra.items()})
        return shapes

    @classmethod
    def tiny_config(cls) -> dict:
        return llama_tiny_base(
            architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", moe_intermediate_size=32,
            shared_expert_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
            decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False, qkv_bias=True,
            use_sliding_window=False, router_aux_loss_coef=0.001,
        )

    flavors = {
        "A2.7B": llama_tiny_base(
            architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", hidden_size=2048,
            intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
            num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, head_dim=128,
            vocab_size=151936, max_position_embeddings=8192, num_experts=60, num_experts_per_tok=4,
            decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False, rope_theta=1e6,
            rms_norm_eps=1e-6),
    }


class Qwen3Moe(Qwen2Moe):
    name = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)
    model_types = ("qwen3_moe",)
    key_marker = "\0qwen3"  # same keys as other `mlp.experts` families: detected by config only
    shared_key = None
    attention_bias = False
    hf_module = "qwen3_moe"
    hf_prefix = "Qwen3Moe"

    @classmethod
    def shared_expert_stack(cls, block):
        return None

    @classmethod
    def shared_expert_module(cls, block):
        return None

    @classmethod
    def shared_d_mid(cls, config: dict) -> int | None:
        return None

    @classmethod
    def tensor_shapes(cls, config: dict) -> dict[str, tuple[int, ...]]:
        shapes = llama_model_shapes(cls, config)
        hd = int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))
        for layer in range(int(config["num_hidden_layers"])):
            shapes[f"model.layers.{layer}.self_attn.q_norm.weight"] = (hd,)
            shapes[f"model.layers.{layer}.self_attn.k_norm.weight"] = (hd,)
        return shapes

    @classmethod
    def tiny_config(cls) -> dict:
        return llama_tiny_base(
            architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", moe_intermediate_size=32,
            num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
            norm_topk_prob=True, use_sliding_window=False, router_aux_loss_coef=0.001,
        )

    flavors = {
        # Qwen/Qwen3-235B-A22B and Qwen/Qwen3-30B-A3B config.json (tests/data/configs)
        "235B-A22B": llama_tiny_base(
            architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=4096, intermediate_size=12288,
            moe_intermediate_size=1536, num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
            head_dim=128, vocab_size=151936, max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8,
            decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-6,
            max_window_layers=94, use_sliding_window=False, sliding_window=None, bos_token_id=151643,
            eos_token_id=151645),
        "30B-A3B": llama_tiny_base(
            architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
            moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
            head_dim=128, vocab_size=151936, max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8,
            decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-6,
            max_window_layers=48, use_sliding_window=False, sliding_window=None, bos_token_id=151643,
            eos_token_id=151645),
    }
