"""gpt-oss (120b: 36 layers, 128 experts; 20b: 24 layers, 32 experts): every layer MoE, top-4.

Experts are stored fused, one tensor per layer: `mlp.experts.gate_up_proj` with gate and up
interleaved (in transformers' layout [E, H, 2·d_mid], gate = columns 0::2, up = columns 1::2),
`mlp.experts.down_proj` [E, d_mid, H], and biases `gate_up_proj_bias` [E, 2·d_mid] (interleaved the
same way) and `down_proj_bias` [E, H]. The hub checkpoints store the two weight tensors in MXFP4
(`*_blocks` + `*_scales`, rows = output features); a BF16 checkpoint stores transformers' layout. The
reader gives both as transformers' layout, and one expert's matrix is read by slice.

A neuron i is the gate/up row pair (columns 2i, 2i+1 of gate_up_proj) and row i of down_proj (column
i of W_down). Expert: W_down·((clamp(W_up x + b_up, ±limit) + 1) · g·sigmoid(1.702·g)) + b_down with
g = min(W_gate x + b_gate, limit), limit = `swiglu_limit` (7). Routing: the router (with bias) gives
logits, the top-4 are kept and softmaxed among themselves. Attention: alternating sliding-window (128)
and full layers, each head with a learned sink logit.
"""
from __future__ import annotations

from ...lazy import torch  # imported on first use (moe-ray plan needs none)

from .base import Family, TensorRef, llama_attention_shapes, output_shapes

_ALL = (None, None, None)


class GptOss(Family):
    name = "gpt_oss"
    architectures = ("GptOssForCausalLM",)
    model_types = ("gpt_oss",)
    key_marker = ".mlp.experts.gate_up_proj"
    router_key = "model.layers.{layer}.mlp.router.weight"
    activation = "swiglu_clamped"
    routing = "top-k of the router logits (router bias included), softmax over the k chosen"
    hf_module = "gpt_oss"
    hf_prefix = "GptOss"
    attn_implementation = "eager"  # attention sinks: transformers' gpt-oss has no SDPA path
    has_expert_biases = True
    expert_biases = (
        "experts have biases (gate_up_proj_bias: one per gate and up row; down_proj_bias: one per output) "
        "and the router has one. Static analyses (S1-S6) compare weight matrices only, biases left out; "
        "the dynamic capture computes every expert with its biases, as the model does, and router logits "
        "include the router bias. A neuron i is the gate/up row pair (columns 2i, 2i+1 of gate_up_proj) "
        "and row i of down_proj.")

    @staticmethod
    def _experts(layer: int) -> str:
        return f"model.layers.{layer}.mlp.experts"

    @classmethod
    def expert_d_mid(cls, config: dict) -> int:
        return int(config["intermediate_size"])

    @classmethod
    def stored_format(cls, config: dict) -> str:
        if cls._mxfp4(config):
            return ("MXFP4 experts (E2M1 in blocks of 32, E8M0 scales); attention, router, biases and "
                    f"embeddings in {config.get('torch_dtype') or 'bfloat16'}")
        return super().stored_format(config)

    @staticmethod
    def _mxfp4(config: dict) -> bool:
        return (config.get("quantization_config") or {}).get("quant_method") == "mxfp4"

    # ---- where the experts are -------------------------------------------------------------------
    @classmethod
    def expert_keys(cls, layer: int, expert: int) -> dict[str, TensorRef]:
        p = cls._experts(layer)
        return {"up": TensorRef(f"{p}.gate_up_proj", (expert, _ALL, (1, None, 2)), transpose=True),
                "gate": TensorRef(f"{p}.gate_up_proj", (expert, _ALL, (0, None, 2)), transpose=True),
                "down": TensorRef(f"{p}.down_proj", (expert,), transpose=True)}

    @classmethod
    def expert_tensor_names(cls, layer: int, config: dict) -> set[str]:
        p = cls._experts(layer)
        return {f"{p}.gate_up_proj", f"{p}.down_proj", f"{p}.gate_up_proj_bias", f"{p}.down_proj_bias"}

    @classmethod
    def fused_sources(cls, name: str, layer: int, num_experts: int):
        if name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):  # already fused: one expert at a time
            return [(TensorRef(f"{cls._experts(layer)}.{name.rsplit('.', 1)[1]}", (e,)),) for e in range(num_experts)]
        return None

    @classmethod
    def fuse_experts(cls, config: dict, layer: int, experts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        d_mid = experts[0]["up"].shape[0]
        gate_up = torch.empty(len(experts), experts[0]["up"].shape[1], 2 * d_mid)
        gate_up[:, :, 0::2] = torch.stack([m["gate"].T for m in experts])
        gate_up[:, :, 1::2] = torch.stack([m["up"].T for m in experts])
        bias = torch.empty(len(experts), 2 * d_mid)
        bias[:, 0::2] = torch.stack([m["gate_bias"] for m in experts])
        bias[:, 1::2] = torch.stack([m["up_bias"] for m in experts])
        p = cls._experts(layer)
        return {f"{p}.gate_up_proj": gate_up, f"{p}.gate_up_proj_bias": bias,
                f"{p}.down_proj": torch.stack([m["down"].T for m in experts]),
                f"{p}.down_proj_bias": torch.stack([m["down_bias"] for m in experts])}

    @classmethod
    def storage(cls, key: str, config: dict) -> str:
        fused = key.endswith(".mlp.experts.gate_up_proj") or key.endswith(".mlp.experts.down_proj")
        return "mxfp4" if fused and cls._mxfp4(config) else "float"

    @classmethod
    def neuron_granularity(cls, config: dict) -> int:
        return 32 if cls._mxfp4(config) else 1  # down_proj's MXFP4 blocks run along the neurons

    # ---- the built MoE block -----------------------------------------------------------------------
    @classmethod
    def router_weight(cls, block: torch.nn.Module) -> torch.Tensor:
        return block.router.weight

    @classmethod
    def router_logits(cls, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, block.router.weight, block.router.bias)

    @classmethod
    def topk_renormalized(cls, config: dict) -> bool:
        return True  # a softmax over the chosen logits

    @classmethod
    def expert_stacks(cls, block: torch.nn.Module):
        gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
        return gate_up[..., 0::2].transpose(1, 2), gate_up[..., 1::2].transpose(1, 2), down.transpose(1, 2)

    @classmethod
    def expert_bias_stacks(cls, block: torch.nn.Module):
        bias = block.experts.gate_up_proj_bias
        return bias[:, 0::2], bias[:, 1::2], block.experts.down_proj_bias

    @classmethod
    def expert_activation(cls, config: dict):
        from ...analysis.dynamic import clamped_swiglu

        config = cls.text_config(config)
        return clamped_swiglu(float(config.get("swiglu_alpha", 1.702)), float(config.get("swiglu_limit", 7.0)))

    # ---- layout ------------------------------------------------------------------------------------
    @classmethod
    def tensor_shapes(cls, config: dict) -> dict[str, tuple[int, ...]]:
        h, v = int(config["hidden_size"]), int(config["vocab_size"])
        n, d_mid = cls.num_experts(config), cls.expert_d_mid(config)
        heads = int(config["num_attention_heads"])
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for layer in range(int(config["num_hidden_layers"])):
            p = f"model.layers.{layer}"
            shapes[f"{p}.input_layernorm.weight"] = (h,)
            shapes.update(llama_attention_shapes(config, f"{p}.self_attn", bias=True))
            shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
            shapes[f"{p}.self_attn.sinks"] = (heads,)
            shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
            shapes[f"{p}.mlp.router.weight"] = (n, h)
            shapes[f"{p}.mlp.router.bias"] = (n,)
            e = cls._experts(layer)
            shapes.update({f"{e}.gate_up_proj": (n, h, 2 * d_mid), f"{e}.gate_up_proj_bias": (n, 2 * d_mid),
                           f"{e}.down_proj": (n, d_mid, h), f"{e}.down_proj_bias": (n, h)})
        shapes.update(output_shapes(config, h, v))
        return shapes

    @classmethod
    def tiny_config(cls) -> dict:
        return {
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
            "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 8, "num_experts_per_tok": 4,
            "experts_per_token": 4, "layer_types": ["sliding_attention", "full_attention"] * 2,
            "sliding_window": 6, "vocab_size": 512, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,  # yarn: 64 x 32
            "rope_theta": 150000, "hidden_act": "silu", "tie_word_embeddings": False,
            "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                             "original_max_position_embeddings": 64, "rope_type": "yarn", "truncate": False},
            # the real clamp is 7; at tiny weights' scale this limit makes it bite on some elements
            "swiglu_limit": 0.2, "router_aux_loss_coef": 0.9, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "bfloat16",
            "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                               "model.embed_tokens", "lm_head"],
                                    "quant_method": "mxfp4"},
        }

    flavors = {
        # openai/gpt-oss-120b and openai/gpt-oss-20b config.json
        "120b": {
            "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
            "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
            "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
            "layer_types": ["sliding_attention", "full_attention"] * 18, "max_position_embeddings": 131072,
            "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 36,
            "num_key_value_heads": 8, "num_local_experts": 128, "output_router_logits": False, "pad_token_id": 199999,
            "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                               "model.embed_tokens", "lm_head"],
                                    "quant_method": "mxfp4"},
            "rms_norm_eps": 1e-05,
            "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                             "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
            "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
            "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True,
            "vocab_size": 201088},
    }
    flavors["20b"] = {**flavors["120b"], "num_hidden_layers": 24, "num_local_experts": 32,
                      "layer_types": ["sliding_attention", "full_attention"] * 12}
