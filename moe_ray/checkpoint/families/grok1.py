"""Grok-1 (314B, HF safetensors port): `moe_block` with experts linear (gate), linear_v (up),
linear_1 (down), exact GELU, softmax over all 8 logits then top-2 without renormalisation,
four `.scale` RMSNorms per layer, attention q/k/v/o under `attn`, tied lm_head."""
from __future__ import annotations

from ...lazy import torch  # imported on first use (moe-ray plan needs none)

from .base import Family, llama_attention_shapes

_GROK_BASE = {
    "architectures": ["Grok1ModelForCausalLM"],
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "attn_output_multiplier": 0.08838834764831845,
    "embedding_multiplier_scale": 78.38367176906169,
    "output_multiplier_scale": 0.5773502691896257,
    "max_attn_value": 30.0,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


class Grok1(Family):
    name = "grok1"
    architectures = ("Grok1ModelForCausalLM", "Grok1ForCausalLM")
    model_types = ("grok-1", "grok1")
    key_marker = ".moe_block.experts."
    router_key = "model.layers.{layer}.moe_block.gate.weight"
    expert_key = "model.layers.{layer}.moe_block.experts.{expert}.{proj}.weight"
    expert_proj = {"up": "linear_v", "gate": "linear", "down": "linear_1"}
    dense_key = None
    activation = "gelu"
    own_module = "grok1"
    moe_hub_name = "moe_block"
    routing = "softmax over all experts, then top-k of the probabilities, no renormalisation"

    @classmethod
    def expert_d_mid(cls, config: dict) -> int:
        return int(config["intermediate_size"])

    @classmethod
    def final_norm_key(cls) -> str:
        return "model.norm.scale"

    @classmethod
    def embedding_scale(cls, config: dict) -> float:
        return float(config.get("embedding_multiplier_scale", 1.0))

    @classmethod
    def output_scale(cls, config: dict) -> float:
        return float(config.get("output_multiplier_scale", 1.0))

    @classmethod
    def topk_renormalized(cls, config: dict) -> bool:
        return False  # the top-2 probabilities of the softmax over all 8, as they are

    @classmethod
    def tensor_shapes(cls, config: dict) -> dict[str, tuple[int, ...]]:
        h, v = int(config["hidden_size"]), int(config["vocab_size"])
        d_mid, n_exp = cls.expert_d_mid(config), cls.num_experts(config)
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for layer in range(int(config["num_hidden_layers"])):
            p = f"model.layers.{layer}"
            shapes.update(llama_attention_shapes(config, f"{p}.attn"))
            for norm in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm"):
                shapes[f"{p}.{norm}.scale"] = (h,)
            shapes[cls.router_weight_key(layer)] = (n_exp, h)
            for e in range(n_exp):
                keys = cls.expert_keys(layer, e)
                shapes[keys["up"]] = (d_mid, h)
                shapes[keys["gate"]] = (d_mid, h)
                shapes[keys["down"]] = (h, d_mid)
        shapes["model.norm.scale"] = (h,)
        return shapes

    @classmethod
    def tiny_config(cls) -> dict:
        return dict(_GROK_BASE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                    max_position_embeddings=2048, embedding_multiplier_scale=8.0)

    flavors = {
        "314B": dict(_GROK_BASE, hidden_size=6144, intermediate_size=32768, num_hidden_layers=64,
                     num_attention_heads=48, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                     max_position_embeddings=8192,
                     auto_map={"AutoModelForCausalLM": "modeling_grok1.Grok1ModelForCausalLM"}),
    }
