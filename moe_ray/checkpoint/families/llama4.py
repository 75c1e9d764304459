"""Llama 4 (Scout: 16 experts, every layer MoE; Maverick: 128 experts, MoE every
`interleave_moe_layer_step` = 2 layers): top-1 routing, a shared expert, experts stored fused.

The hub checkpoints (`Llama4ForConditionalGeneration`) hold the language model under
`language_model.model.` beside a vision tower; text-only checkpoints (`Llama4ForCausalLM`,
model_type `llama4_text`) under `model.` (the `llama4_text` adapter). config.json nests the language
model's fields in `text_config`.

An MoE layer's `feed_forward` holds `router.weight` [E, H], `experts.gate_up_proj` [E, H, 2·d_mid]
(W_gate^T then W_up^T along the last dim) and `experts.down_proj` [E, d_mid, H] (W_down^T), read one
expert and one matrix at a time, and `shared_expert.{gate,up,down}_proj` ("SE", as wide as a routed
expert); other layers a dense `feed_forward` of `intermediate_size_mlp`. Routing: the top-1 logit's
expert gets weight sigmoid(logit), and the token is scaled by that weight *before* the expert runs
(expert(w·x), not w·expert(x)); the shared expert is added unweighted. Attention: RoPE layers use
chunked attention (`attention_chunk_size`) and L2 q/k norms, every fourth layer is NoPE with full
attention and temperature tuning.
"""
from __future__ import annotations

from ...lazy import torch  # imported on first use (moe-ray plan needs none)

from .base import Family, TensorRef, llama_attention_shapes, mlp_as_stack, mlp_shapes

_ALL = (None, None, None)


def _halves(i: int) -> tuple:
    """Index of the i-th half of a dimension (gate_up_proj's last dim: gate, then up)."""
    return ("chunk", i, 2)


class Llama4(Family):
    name = "llama4"
    architectures = ("Llama4ForConditionalGeneration",)
    model_types = ("llama4",)
    key_prefix = "language_model.model."
    key_marker = "language_model.model.layers."
    activation = "silu"
    routing = ("top-1 of the router logits, weight sigmoid(logit), the token scaled by it before the expert "
               "runs; the shared expert added unweighted")
    hf_module = "llama4"
    hf_prefix = "Llama4Text"
    moe_hub_name = moe_module = "feed_forward"

    @classmethod
    def text_config(cls, config: dict) -> dict:
        return config.get("text_config") or config

    @classmethod
    def decoder_config(cls, config: dict):
        # the hub configs say "attn_temperature_tuning": 4 (Meta's code reads it as a truth value);
        # transformers 5's strict Llama4TextConfig accepts only a bool
        text = dict(cls.text_config(config))
        if "attn_temperature_tuning" in text:
            text["attn_temperature_tuning"] = bool(text["attn_temperature_tuning"])
        return super().decoder_config(text)

    @classmethod
    def _p(cls, layer: int) -> str:
        return f"{cls.layer_prefix(layer)}feed_forward"

    # ---- facts -------------------------------------------------------------------------------
    @classmethod
    def is_moe_layer(cls, config: dict, layer: int) -> bool:
        if config.get("moe_layers") is not None:
            return layer in config["moe_layers"]
        step = int(config.get("interleave_moe_layer_step") or 1)
        return cls.num_experts(config) > 0 and step > 0 and layer % step == step - 1

    @classmethod
    def expert_d_mid(cls, config: dict) -> int:
        return int(config["intermediate_size"])

    @classmethod
    def shared_d_mid(cls, config: dict) -> int | None:
        return int(config["intermediate_size"])

    @classmethod
    def dense_d_mid(cls, config: dict) -> int | None:
        return int(config.get("intermediate_size_mlp") or config["intermediate_size"])

    # ---- keys --------------------------------------------------------------------------------
    router_key = "{prefix}layers.{layer}.feed_forward.router.weight"

    @classmethod
    def router_weight_key(cls, layer: int) -> str:
        return cls.router_key.format(prefix=cls.key_prefix, layer=layer)

    @classmethod
    def expert_keys(cls, layer: int, expert: int) -> dict[str, TensorRef]:
        gate_up, down = f"{cls._p(layer)}.experts.gate_up_proj", f"{cls._p(layer)}.experts.down_proj"
        return {"up": TensorRef(gate_up, (expert, _ALL, _halves(1)), transpose=True),
                "gate": TensorRef(gate_up, (expert, _ALL, _halves(0)), transpose=True),
                "down": TensorRef(down, (expert,), transpose=True)}

    shared_key = "feed_forward.shared_expert"  # (the keys below carry the prefix)

    @classmethod
    def shared_expert_keys(cls, layer: int) -> dict[str, str]:
        return {m: f"{cls._p(layer)}.shared_expert.{p}.weight" for m, p in cls.expert_proj.items()}

    @classmethod
    def dense_ffn_keys(cls, layer: int) -> dict[str, str]:
        return {m: f"{cls._p(layer)}.{p}.weight" for m, p in cls.dense_proj.items()}

    @classmethod
    def fused_sources(cls, name: str, layer: int, num_experts: int):
        if name in ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"):
            return [(TensorRef(cls.layer_prefix(layer) + name, (e,)),) for e in range(num_experts)]
        return None

    @classmethod
    def fuse_experts(cls, config: dict, layer: int, experts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        p = cls._p(layer)
        return {f"{p}.experts.gate_up_proj": torch.stack([torch.cat([m["gate"].T, m["up"].T], dim=1) for m in experts]),
                f"{p}.experts.down_proj": torch.stack([m["down"].T for m in experts])}

    # ---- the built MoE block -----------------------------------------------------------------
    @classmethod
    def router_weight(cls, block: torch.nn.Module) -> torch.Tensor:
        return block.router.weight

    @classmethod
    def route(cls, router_logits: torch.Tensor, top_k: int, config: dict, block=None):
        values, experts = torch.topk(router_logits.float(), top_k, dim=-1)
        return torch.sigmoid(values), experts

    @classmethod
    def weigh(cls, router_logits: torch.Tensor, experts: torch.Tensor, config: dict, block=None):
        return torch.sigmoid(router_logits.float().gather(-1, experts.long()))

    @classmethod
    def reroute_hook(cls, block: torch.nn.Module, reroute):
        """The router's scores [N, E] (sigmoid of the chosen logits, 0 elsewhere) scale each expert's
        input, so a choice is rerouted there: `reroute`'s (index, weights) scattered into zeros."""
        def post(_module, args, output):
            scores, logits = output
            index = logits.topk(block.router.top_k, dim=-1).indices
            index, weights = reroute(args[0], index, scores.gather(1, index))
            return torch.zeros_like(scores).scatter(1, index, weights.to(scores.dtype)), logits
        return block.router.register_forward_hook(post)

    @classmethod
    def shared_expert_module(cls, block):
        return block.shared_expert

    @classmethod
    def intervention_semantics(cls, config: dict) -> dict[str, str]:
        return {
            "norm_routing": "each token's top-k experts by the L2 norm of their outputs instead of the router's; "
                            "the weight of each is sigmoid(its logit), which scales the token before the expert",
            "ablation": "the expert's router row deleted: the top-k of the other experts' logits, weights "
                        "sigmoid(logit) as always (no normalisation to remove)",
            "shared_expert_ablation": "the shared expert's output (SE) left out, the routed experts unchanged",
        }

    @classmethod
    def expert_stacks(cls, block: torch.nn.Module):
        gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
        d_mid = down.shape[1]
        return gate_up[..., :d_mid].transpose(1, 2), gate_up[..., d_mid:].transpose(1, 2), down.transpose(1, 2)

    @classmethod
    def shared_expert_stack(cls, block):
        return mlp_as_stack(block.shared_expert)

    # ---- layout ------------------------------------------------------------------------------
    @classmethod
    def lm_head_key(cls) -> str:
        return cls.key_prefix[: -len("model.")] + "lm_head.weight"

    @classmethod
    def tensor_shapes(cls, config: dict) -> dict[str, tuple[int, ...]]:
        text = cls.text_config(config)
        h, v = int(text["hidden_size"]), int(text["vocab_size"])
        facts = cls.facts(config)
        n, d_mid = facts.num_experts, facts.d_mid
        shapes: dict[str, tuple[int, ...]] = cls.vision_shapes(config)
        shapes[cls.embed_key()] = (v, h)
        for layer in range(facts.num_layers):
            p = cls.layer_prefix(layer)
            shapes.update(llama_attention_shapes(text, f"{p}self_attn"))
            if layer in facts.moe_layers:
                f = cls._p(layer)
                shapes.update({f"{f}.experts.gate_up_proj": (n, h, 2 * d_mid), f"{f}.experts.down_proj": (n, d_mid, h),
                               f"{f}.router.weight": (n, h)})
                shapes.update(mlp_shapes(cls.shared_expert_keys(layer), d_mid, h))
            else:
                shapes.update(mlp_shapes(cls.dense_ffn_keys(layer), facts.dense_d_mid, h))
            shapes[f"{p}input_layernorm.weight"] = (h,)
            shapes[f"{p}post_attention_layernorm.weight"] = (h,)
        shapes[f"{cls.key_prefix}norm.weight"] = (h,)
        if not (text.get("tie_word_embeddings") or config.get("tie_word_embeddings")):
            shapes[cls.lm_head_key()] = (v, h)
        return shapes

    @classmethod
    def vision_shapes(cls, config: dict) -> dict[str, tuple[int, ...]]:
        """The vision tower and projector beside the language model (on disk; never analysed)."""
        vision = config.get("vision_config")
        if not vision:
            return {}
        hv, iv = int(vision["hidden_size"]), int(vision["intermediate_size"])
        patch, channels = int(vision["patch_size"]), int(vision.get("num_channels", 3))
        positions = (int(vision["image_size"]) // patch) ** 2 + 1
        shapes = {"vision_model.class_embedding": (hv,), "vision_model.positional_embedding_vlm": (positions, hv),
                  "vision_model.patch_embedding.linear.weight": (hv, channels * patch * patch)}
        for norm in ("layernorm_pre", "layernorm_post"):
            shapes.update({f"vision_model.{norm}.weight": (hv,), f"vision_model.{norm}.bias": (hv,)})
        for layer in range(int(vision["num_hidden_layers"])):
            p = f"vision_model.model.layers.{layer}"
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shapes.update({f"{p}.self_attn.{proj}.weight": (hv, hv), f"{p}.self_attn.{proj}.bias": (hv,)})
            shapes.update({f"{p}.mlp.fc1.weight": (iv, hv), f"{p}.mlp.fc1.bias": (iv,),
                           f"{p}.mlp.fc2.weight": (hv, iv), f"{p}.mlp.fc2.bias": (hv,)})
            for norm in ("input_layernorm", "post_attention_layernorm"):
                shapes.update({f"{p}.{norm}.weight": (hv,), f"{p}.{norm}.bias": (hv,)})
        proj_in, proj_out = int(vision["projector_input_dim"]), int(vision["projector_output_dim"])
        shapes["vision_model.vision_adapter.mlp.fc1.weight"] = (proj_in, iv)
        shapes["vision_model.vision_adapter.mlp.fc2.weight"] = (proj_out, proj_in)
        shapes["multi_modal_projector.linear_1.weight"] = (int(cls.text_config(config)["hidden_size"]),
                                                           int(vision["vision_output_dim"]))
        return shapes

    @classmethod
    def tiny_text_config(cls) -> dict:
        return {
            "model_type": "llama4_text", "hidden_size": 64, "intermediate_size": 32, "intermediate_size_mlp": 128,
            "num_hidden_layers": 4, "interleave_moe_layer_step": 2, "num_local_experts": 8, "num_experts_per_tok": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None,
            "use_qk_norm": True, "no_rope_layers": [1, 1, 1, 0], "attention_chunk_size": 8,
            "attn_temperature_tuning": True, "floor_scale": 4, "attn_scale": 0.1, "attention_bias": False,
            "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0, "router_aux_loss_coef": 0.001, "torch_dtype": "bfloat16",
        }

    @classmethod
    def tiny_config(cls) -> dict:
        return {
            "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "text_config": cls.tiny_text_config(),
            "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 16, "intermediate_size": 32,
                              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                              "num_channels": 3, "projector_input_dim": 24, "projector_output_dim": 24,
                              "vision_output_dim": 24, "pixel_shuffle_ratio": 0.5, "norm_eps": 1e-5},
        }

    flavors: dict = {}  # filled below from the published configs


_SCOUT_TEXT = {
    "attention_bias": False, "attention_chunk_size": 8192, "attention_dropout": 0.0, "attn_scale": 0.1,
    "attn_temperature_tuning": 4, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
    "floor_scale": 8192, "for_llm_compressor": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "max_position_embeddings": 262144, "model_type": "llama4_text",
    "moe_layers": list(range(48)), "no_rope_layers": [1, 1, 1, 0] * 12, "num_attention_heads": 40,
    "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8, "num_local_experts": 16,
    "output_router_logits": False, "pad_token_id": 200018, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "torch_dtype": "bfloat16",
    "use_cache": True, "use_qk_norm": True, "vocab_size": 202048}
_VISION = {
    "attention_dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1408, "image_size": 336, "initializer_range": 0.02,
    "intermediate_size": 5632, "model_type": "llama4_vision_model", "multi_modal_projector_bias": False,
    "norm_eps": 1e-05, "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 34, "patch_size": 14,
    "pixel_shuffle_ratio": 0.5, "projector_dropout": 0.0, "projector_input_dim": 4096, "projector_output_dim": 4096,
    "rope_theta": 10000, "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
    "vision_output_dim": 4096}
Llama4.flavors = {
    "scout": {"architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 200080,
              "eoi_token_index": 200081, "image_token_index": 200092, "model_type": "llama4",
              "text_config": _SCOUT_TEXT, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "transformers_version": "4.51.0", "vision_config": _VISION},
    "maverick": {"architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 200080,
                 "eoi_token_index": 200081, "image_token_index": 200092, "model_type": "llama4",
                 "text_config": {k: v for k, v in {**_SCOUT_TEXT, "interleave_moe_layer_step": 2,
                                                   "max_position_embeddings": 1048576, "num_local_experts": 128,
                                                   "rope_scaling": None, "use_qk_norm": False}.items()
                                 if k not in ("moe_layers", "no_rope_layers")},
                 "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0.dev0",
                 "vision_config": _VISION},
}


class Llama4Text(Llama4):
    """A text-only Llama 4 checkpoint (`Llama4ForCausalLM`): the same layers under `model.`."""

    name = "llama4_text"
    architectures = ("Llama4ForCausalLM",)
    model_types = ("llama4_text",)
    key_prefix = "model."
    key_marker = "\0llama4_text"  # `model.layers.*.feed_forward.experts`: detected by config
    flavors = {}

    @classmethod
    def tiny_config(cls) -> dict:
        return {**Llama4.tiny_text_config(), "architectures": ["Llama4ForCausalLM"]}
