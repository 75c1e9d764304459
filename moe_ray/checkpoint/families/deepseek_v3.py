"""DeepSeek-V3 / R1 (`deepseek_v3`) and DeepSeek-V2 (`deepseek_v2`): MLA attention, the first
`first_k_dense_replace` layers dense, fine-grained routed experts plus shared experts ("SE") under
`mlp.experts.e.*_proj` / `mlp.shared_experts.*_proj`.

Routing (each as transformers' DeepseekV3TopkRouter / DeepseekV2TopkRouter computes it):
- V3 (`topk_method` noaux_tc): affinities s = sigmoid(logits); choice = s + `e_score_correction_bias`;
  each of `n_group` groups is scored by the sum of its two largest choices, the best `topk_group`
  groups are kept, the top-k choices among their experts are selected; weights are the selected s,
  normalised to sum 1 (`norm_topk_prob`), times `routed_scaling_factor`.
- V2: s = softmax(logits); `greedy`: top-k of s; `group_limited_greedy`: groups scored by their
  largest s, the best `topk_group` kept, top-k of s among them; weights times `routed_scaling_factor`.

V3's hub checkpoint is FP8: every `*_proj.weight` of the decoder layers is F8_E4M3 with a
`weight_scale_inv` per 128x128 block (`quantization_config`); router, norms, embeddings, head and the
MTP layer's `eh_proj` are BF16. The multi-token-prediction layer (`num_nextn_predict_layers`, layer 61)
is not part of the main stack: its experts are analysed only on request (spec field `mtp`).
"""
from __future__ import annotations

import math

from ...lazy import torch  # imported on first use (moe-ray plan needs none)

from ..quant import fp8_block_size, is_fp8_config
from .base import mlp_shapes, output_shapes
from .deepseek_moe import DeepseekMoe

_FP8_EXAMPLE = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}


def group_limited_topk(scores: torch.Tensor, choice: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                       group_score: str, masked: float) -> torch.Tensor:
    """Indices [T, k] of the top-k `choice` among the experts of each token's best `topk_group` groups
    (a group scored by the sum of its two largest choices, "top2_sum", or its largest, "max")."""
    T, E = choice.shape
    grouped = choice.view(T, n_group, E // n_group)
    if group_score == "top2_sum":
        group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.amax(dim=-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
    allowed = keep.repeat_interleave(E // n_group, dim=1)
    return choice.masked_fill(~allowed, masked).topk(top_k, dim=-1).indices


def _by_weight(weights: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = weights.argsort(dim=-1, descending=True, stable=True)
    return weights.gather(1, order), experts.gather(1, order)


def mla_attention_shapes(config: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    """Multi-head latent attention (DeepSeek-V2/V3) under `prefix` (…self_attn)."""
    h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    nope, rope, v = (int(config[k]) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    kv_rank, q_rank = int(config["kv_lora_rank"]), config.get("q_lora_rank")
    shapes: dict[str, tuple[int, ...]] = {}
    if q_rank:
        shapes.update({f"{prefix}.q_a_proj.weight": (int(q_rank), h), f"{prefix}.q_a_layernorm.weight": (int(q_rank),),
                       f"{prefix}.q_b_proj.weight": (heads * (nope + rope), int(q_rank))})
    else:
        shapes[f"{prefix}.q_proj.weight"] = (heads * (nope + rope), h)
    shapes.update({f"{prefix}.kv_a_proj_with_mqa.weight": (kv_rank + rope, h),
                   f"{prefix}.kv_a_layernorm.weight": (kv_rank,),
                   f"{prefix}.kv_b_proj.weight": (heads * (nope + v), kv_rank),
                   f"{prefix}.o_proj.weight": (h, heads * v)})
    return shapes


class DeepseekV3(DeepseekMoe):
    """DeepSeekMoE's expert layout (fine-grained routed experts, shared experts as SE, dense first
    layers: its facts are inherited) with MLA, V3's router and transformers' own decoder layers."""

    name = "deepseek_v3"
    architectures = ("DeepseekV3ForCausalLM",)
    model_types = ("deepseek_v3",)
    key_marker = ".mlp.gate.e_score_correction_bias"
    router_key = "model.layers.{layer}.mlp.gate.weight"
    expert_key = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
    shared_key = "model.layers.{layer}.mlp.shared_experts.{proj}.weight"
    activation = "silu"
    routing = ("sigmoid affinities + e_score_correction_bias, group-limited top-k (n_group groups scored by "
               "their two largest, topk_group kept), weights normalised then x routed_scaling_factor")
    own_module = None  # transformers has DeepSeek-V2/V3 decoder layers
    hf_module = "deepseek_v3"
    hf_prefix = "DeepseekV3"
    keep_fp32 = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")

    # ---- facts -------------------------------------------------------------------------------
    @classmethod
    def mtp_layers(cls, config: dict) -> tuple[int, ...]:
        n = int(config["num_hidden_layers"])
        return tuple(range(n, n + int(config.get("num_nextn_predict_layers") or 0)))

    @classmethod
    def stored_format(cls, config: dict) -> str:
        if is_fp8_config(config):
            rows, cols = fp8_block_size(config.get("quantization_config"))
            return f"FP8 E4M3 linear weights with {rows}x{cols} block scales (weight_scale_inv); router, norms, " \
                   f"embeddings in {config.get('torch_dtype') or 'bfloat16'}"
        return super().stored_format(config)

    # ---- routing -----------------------------------------------------------------------------
    @classmethod
    def route(cls, router_logits: torch.Tensor, top_k: int, config: dict, block=None):
        bias = None if block is None else block.gate.e_score_correction_bias
        return cls.select(router_logits, top_k, config, bias)

    @classmethod
    def select(cls, router_logits: torch.Tensor, top_k: int, config: dict, bias: torch.Tensor | None = None,
               removed: torch.Tensor | None = None):
        """The V3 rule on logits [T, E] with an optional e_score_correction_bias [E]; experts `removed`
        ([T, E] bool, an ablation) are never chosen."""
        scores = router_logits.float().sigmoid()
        choice = scores if bias is None else scores + bias.float()
        if removed is not None:
            choice = choice.masked_fill(removed, float("-inf"))
        experts = group_limited_topk(scores, choice, top_k, int(config.get("n_group") or 1),
                                     int(config.get("topk_group") or 1), "top2_sum", float("-inf"))
        weights = scores.gather(1, experts)
        if config.get("norm_topk_prob", True):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return _by_weight(weights * float(config.get("routed_scaling_factor") or 1.0), experts)

    @classmethod
    def router_logits(cls, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ cls.router_weight(block).float().T  # the router runs in float32

    @classmethod
    def topk_renormalized(cls, config: dict) -> bool:
        return bool(config.get("norm_topk_prob", True))

    @classmethod
    def weigh(cls, router_logits: torch.Tensor, experts: torch.Tensor, config: dict, block=None):
        weights = router_logits.float().sigmoid().gather(-1, experts.long())
        if cls.topk_renormalized(config):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * float(config.get("routed_scaling_factor") or 1.0)

    @classmethod
    def route_without(cls, router_logits: torch.Tensor, removed: torch.Tensor, top_k: int, config: dict, block=None):
        bias = None if block is None else block.gate.e_score_correction_bias
        return cls.select(router_logits, top_k, config, bias, removed)

    @classmethod
    def intervention_semantics(cls, config: dict) -> dict[str, str]:
        renorm = cls.topk_renormalized(config)
        scale = float(config.get("routed_scaling_factor") or 1.0)
        return {
            "norm_routing": "each token's top-k experts by the L2 norm of their outputs instead of the router's "
                            "(groups ignored); weights their sigmoid scores" + (", normalised over the k" if renorm else "")
                            + f", x routed_scaling_factor {scale:g}",
            "ablation": "the expert never chosen: the family's group-limited choice among the others (scores plus "
                        "the correction bias), weights their sigmoid scores" + (", normalised over the k" if renorm
                                                                                else "") + f", x {scale:g}",
            "shared_expert_ablation": "the shared experts' output (SE) left out, the routed experts unchanged",
        }

    # ---- storage -----------------------------------------------------------------------------
    @classmethod
    def storage(cls, key: str, config: dict) -> str:
        module = key.rsplit(".", 2)[-2] if key.endswith(".weight") else ""
        quantised = ".layers." in f".{key}" and "_proj" in module and module != "eh_proj"
        return "fp8_block" if is_fp8_config(config) and quantised else "float"

    @classmethod
    def neuron_granularity(cls, config: dict) -> int:
        if not is_fp8_config(config):
            return 1
        rows, cols = fp8_block_size(config.get("quantization_config"))
        return math.lcm(rows, cols)  # neurons are rows of W_up/W_gate and columns of W_down

    # ---- layout ------------------------------------------------------------------------------
    has_router_bias_buffer = True

    @classmethod
    def decoder_layer_shapes(cls, config: dict, layer: int, moe: bool) -> dict[str, tuple[int, ...]]:
        h = int(config["hidden_size"])
        p = f"model.layers.{layer}"
        shapes = mla_attention_shapes(config, f"{p}.self_attn")
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        if not moe:
            shapes.update(mlp_shapes(cls.dense_ffn_keys(layer), int(config["intermediate_size"]), h))
            return shapes
        n, d_mid = cls.num_experts(config), cls.expert_d_mid(config)
        shapes[cls.router_weight_key(layer)] = (n, h)
        if cls.has_router_bias_buffer:
            shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (n,)
        for e in range(n):
            shapes.update(mlp_shapes(cls.expert_keys(layer, e), d_mid, h))
        if cls.shared_d_mid(config):
            shapes.update(mlp_shapes(cls.shared_expert_keys(layer), cls.shared_d_mid(config), h))
        return shapes

    @classmethod
    def tensor_shapes(cls, config: dict) -> dict[str, tuple[int, ...]]:
        h, v = int(config["hidden_size"]), int(config["vocab_size"])
        facts = cls.facts(config)
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for layer in range(facts.num_layers):
            shapes.update(cls.decoder_layer_shapes(config, layer, layer in facts.moe_layers))
        for layer in facts.mtp_layers:  # on disk after the main stack: a decoder layer + its own ends
            p = f"model.layers.{layer}"
            shapes.update({f"{p}.embed_tokens.weight": (v, h), f"{p}.enorm.weight": (h,), f"{p}.hnorm.weight": (h,),
                           f"{p}.eh_proj.weight": (h, 2 * h)})
            shapes.update(cls.decoder_layer_shapes(config, layer, True))
            shapes.update({f"{p}.shared_head.norm.weight": (h,), f"{p}.shared_head.head.weight": (v, h)})
        shapes.update(output_shapes(config, h, v))
        return shapes

    @classmethod
    def tiny_config(cls) -> dict:
        return {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 40,
            "num_hidden_layers": 4, "num_nextn_predict_layers": 1, "first_k_dense_replace": 1,
            "moe_layer_freq": 1, "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4,
            "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
            "norm_topk_prob": True, "routed_scaling_factor": 2.5,
            "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16,
            "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
            "vocab_size": 512, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
            # the real format at a tiny block size, so that full, partial and many blocks all occur
            "quantization_config": {**_FP8_EXAMPLE, "weight_block_size": [16, 16]},
        }

    flavors = {
        # deepseek-ai/DeepSeek-V3 config.json (R1 and V3-0324 share it), auto_map dropped
        "671B": {
            "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
            "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
            "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
            "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
            "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
            "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "quantization_config": {**_FP8_EXAMPLE, "weight_block_size": [128, 128]},
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                             "original_max_position_embeddings": 4096, "type": "yarn"},
            "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
            "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
            "transformers_version": "4.46.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280},
    }


class DeepseekV2(DeepseekV3):
    name = "deepseek_v2"
    architectures = ("DeepseekV2ForCausalLM",)
    model_types = ("deepseek_v2",)
    key_marker = ".self_attn.kv_a_proj_with_mqa."
    routing = ("softmax over all experts, top-k (group_limited_greedy: among the topk_group groups with the "
               "largest expert probability), weights x routed_scaling_factor")
    hf_module = "deepseek_v2"
    hf_prefix = "DeepseekV2"
    keep_fp32 = ("mlp.gate.weight",)
    has_router_bias_buffer = False

    @classmethod
    def mtp_layers(cls, config: dict) -> tuple[int, ...]:
        return ()

    @classmethod
    def weigh(cls, router_logits: torch.Tensor, experts: torch.Tensor, config: dict, block=None):
        probs = router_logits.float().softmax(dim=-1).gather(-1, experts.long())
        return probs * float(config.get("routed_scaling_factor") or 1.0)

    @classmethod
    def topk_renormalized(cls, config: dict) -> bool:
        return False

    @classmethod
    def route_without(cls, router_logits: torch.Tensor, removed: torch.Tensor, top_k: int, config: dict, block=None):
        return cls.route(router_logits.float().masked_fill(removed, float("-inf")), top_k, config, block=block)

    @classmethod
    def intervention_semantics(cls, config: dict) -> dict[str, str]:
        scale = float(config.get("routed_scaling_factor") or 1.0)
        return {
            "norm_routing": "each token's top-k experts by the L2 norm of their outputs (groups ignored); weights "
                            f"their softmax-over-all probabilities x routed_scaling_factor {scale:g}, not renormalised",
            "ablation": "the expert's router row deleted: a softmax over the others, the family's (group-limited) "
                        f"top-k of them, weights those probabilities x {scale:g}",
            "shared_expert_ablation": "the shared experts' output (SE) left out, the routed experts unchanged",
        }

    @classmethod
    def route(cls, router_logits: torch.Tensor, top_k: int, config: dict, block=None):
        scores = router_logits.float().softmax(dim=-1)
        if config.get("topk_method") == "group_limited_greedy":
            experts = group_limited_topk(scores, scores, top_k, int(config["n_group"]), int(config["topk_group"]),
                                         "max", 0.0)
        else:
            experts = scores.topk(top_k, dim=-1).indices
        return _by_weight(scores.gather(1, experts) * float(config.get("routed_scaling_factor") or 1.0), experts)

    @classmethod
    def tiny_config(cls) -> dict:
        cfg = DeepseekV3.tiny_config()
        for key in ("quantization_config", "num_nextn_predict_layers", "scoring_func", "norm_topk_prob"):
            cfg.pop(key)
        cfg.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", q_lora_rank=None,
                   topk_method="group_limited_greedy", routed_scaling_factor=16.0, n_shared_experts=2,
                   moe_intermediate_size=32)
        return cfg

    flavors = {
        # deepseek-ai/DeepSeek-V2 config.json, auto_map dropped
        "236B": {
            "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "ep_size": 1,
            "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
            "intermediate_size": 12288, "kv_lora_rank": 512, "max_position_embeddings": 163840,
            "model_type": "deepseek_v2", "moe_intermediate_size": 1536, "moe_layer_freq": 1, "n_group": 8,
            "n_routed_experts": 160, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 128,
            "num_experts_per_tok": 6, "num_hidden_layers": 60, "num_key_value_heads": 128, "pretraining_tp": 1,
            "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                             "original_max_position_embeddings": 4096, "type": "yarn"},
            "rope_theta": 10000, "routed_scaling_factor": 16.0, "scoring_func": "softmax", "seq_aux": True,
            "tie_word_embeddings": False, "topk_group": 3, "topk_method": "group_limited_greedy",
            "torch_dtype": "bfloat16", "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128,
            "vocab_size": 102400},
    }
