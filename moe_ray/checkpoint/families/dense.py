"""Dense llama-style models (Mistral 7B, Llama): the paper's reference FFN "F". No experts."""
from __future__ import annotations

from .base import Family, llama_model_shapes, llama_tiny_base


class Dense(Family):
    name = "dense"
    architectures = ("MistralForCausalLM", "LlamaForCausalLM")
    model_types = ("mistral", "llama")
    key_marker = ".mlp.gate_proj."
    routing = "none (dense)"

    @classmethod
    def is_moe_layer(cls, config: dict, layer: int) -> bool:
        return False

    @classmethod
    def num_experts(cls, config: dict) -> int:
        return 0

    @classmethod
    def expert_d_mid(cls, config: dict) -> int:
        return int(config["intermediate_size"])

    @classmethod
    def dense_d_mid(cls, config: dict) -> int | None:
        return int(config["intermediate_size"])

    @classmethod
    def tensor_shapes(cls, config: dict) -> dict[str, tuple[int, ...]]:
        return llama_model_shapes(cls, config)

    @classmethod
    def tiny_config(cls) -> dict:
        return llama_tiny_base(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)

    flavors = {
        "mistral-7B": llama_tiny_base(
            architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096,
            intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=32768,
            sliding_window=None),
    }
