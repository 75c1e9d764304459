"""OLMoE (1B-7B): 64 experts under `mlp.experts`, every layer MoE, q/k RMSNorm over the whole
projection, softmax over all experts then top-k (renormalised only if norm_topk_prob)."""
from __future__ import annotations

from ...lazy import torch  # imported on first use (moe-ray plan needs none)

from .base import Family, llama_model_shapes, llama_tiny_base


class Olmoe(Family):
    name = "olmoe"
    architectures = ("OlmoeForCausalLM",)
    model_types = ("olmoe",)
    key_marker = "\0olmoe"  # same keys as other `mlp.experts` families: detected by config only
    router_key = "model.layers.{layer}.mlp.gate.weight"
    expert_key = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
    activation = "silu"
    routing = "softmax over all experts, then top-k (renormalised if norm_topk_prob)"
    hf_module = "olmoe"
    hf_prefix = "Olmoe"

    @classmethod
    def expert_d_mid(cls, config: dict) -> int:
        return int(config["intermediate_size"])

    @classmethod
    def tensor_shapes(cls, config: dict) -> dict[str, tuple[int, ...]]:
        shapes = llama_model_shapes(cls, config)
        h = int(config["hidden_size"])
        n_kv = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        hd = int(config.get("head_dim") or h // int(config["num_attention_heads"]))
        for layer in range(int(config["num_hidden_layers"])):
            shapes[f"model.layers.{layer}.self_attn.q_norm.weight"] = (int(config["num_attention_heads"]) * hd,)
            shapes[f"model.layers.{layer}.self_attn.k_norm.weight"] = (n_kv * hd,)
        return shapes

    @classmethod
    def tiny_config(cls) -> dict:
        return llama_tiny_base(
            architectures=["OlmoeForCausalLM"], model_type="olmoe", intermediate_size=32,
            num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, router_aux_loss_coef=0.01,
            clip_qkv=None,
        )

    flavors = {
        "1B-7B": llama_tiny_base(
            architectures=["OlmoeForCausalLM"], model_type="olmoe", hidden_size=2048,
            intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=16, head_dim=128, vocab_size=50304, max_position_embeddings=4096,
            num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, clip_qkv=None),
    }
