"""What every model family adapter provides, and the pieces most families share.

A family adapter is data first: key templates, the activation, the routing rule and which layers
are MoE. Everything family-specific lives in one adapter module; nothing else in moe-ray branches
on the family name.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from ...errors import CheckpointError

MATRICES: tuple[str, ...] = ("up", "gate", "down")
"""The three expert matrices, in the store's `matrix` coordinate order."""

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True)
class ModelFacts:
    """The numbers an analysis needs about a model, read from its config.json."""

    family: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    d_hid: int
    d_mid: int
    shared_d_mid: int | None
    dense_d_mid: int | None
    activation: str
    routing: str
    vocab_size: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d


def config_value(config: dict, *keys: str, default: Any = None) -> Any:
    """The first of `keys` present in `config` (real configs spell some facts several ways)."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


class Family:
    """Base adapter. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    key_marker: ClassVar[str]  # a substring only this family's expert keys contain

    router_key: ClassVar[str | None] = None  # e.g. "model.layers.{layer}.mlp.gate.weight"
    expert_key: ClassVar[str | None] = None  # "...experts.{expert}.{proj}.weight"
    expert_proj: ClassVar[dict[str, str]] = {"up": "up_proj", "gate": "gate_proj", "down": "down_proj"}
    shared_key: ClassVar[str | None] = None  # "...shared_experts.{proj}.weight"
    dense_key: ClassVar[str | None] = "model.layers.{layer}.mlp.{proj}.weight"
    dense_proj: ClassVar[dict[str, str]] = {"up": "up_proj", "gate": "gate_proj", "down": "down_proj"}
    activation: ClassVar[str] = "silu"
    routing: ClassVar[str] = ""

    # ---- facts -------------------------------------------------------------------------------
    @classmethod
    def num_experts(cls, config: dict) -> int:
        return int(config_value(config, *EXPERT_COUNT_KEYS, default=0) or 0)

    @classmethod
    def top_k(cls, config: dict) -> int:
        return int(config_value(config, "num_experts_per_tok", "moe_topk", default=0) or 0)

    @classmethod
    def expert_d_mid(cls, config: dict) -> int:
        return int(config_value(config, "moe_intermediate_size", "intermediate_size"))

    @classmethod
    def shared_d_mid(cls, config: dict) -> int | None:
        return None

    @classmethod
    def dense_d_mid(cls, config: dict) -> int | None:
        return None

    @classmethod
    def is_moe_layer(cls, config: dict, layer: int) -> bool:
        return True

    @classmethod
    def facts(cls, config: dict) -> ModelFacts:
        n_layers = int(config["num_hidden_layers"])
        return ModelFacts(
            family=cls.name,
            num_layers=n_layers,
            moe_layers=tuple(l for l in range(n_layers) if cls.is_moe_layer(config, l)),
            num_experts=cls.num_experts(config),
            top_k=cls.top_k(config),
            d_hid=int(config["hidden_size"]),
            d_mid=cls.expert_d_mid(config),
            shared_d_mid=cls.shared_d_mid(config),
            dense_d_mid=cls.dense_d_mid(config),
            activation=cls.activation,
            routing=cls.routing,
            vocab_size=int(config.get("vocab_size", 0)),
        )

    # ---- key names ---------------------------------------------------------------------------
    @classmethod
    def router_weight_key(cls, layer: int) -> str:
        return cls.router_key.format(layer=layer)

    @classmethod
    def expert_keys(cls, layer: int, expert: int) -> dict[str, str]:
        """Checkpoint keys of one routed expert's matrices, by matrix name (up, gate, down)."""
        return {m: cls.expert_key.format(layer=layer, expert=expert, proj=p) for m, p in cls.expert_proj.items()}

    @classmethod
    def shared_expert_keys(cls, layer: int) -> dict[str, str] | None:
        if cls.shared_key is None:
            return None
        return {m: cls.shared_key.format(layer=layer, proj=p) for m, p in cls.expert_proj.items()}

    @classmethod
    def dense_ffn_keys(cls, layer: int) -> dict[str, str]:
        """Keys of a dense layer's MLP (a reference model's FFN, or an MoE model's dense layer)."""
        return {m: cls.dense_key.format(layer=layer, proj=p) for m, p in cls.dense_proj.items()}

    # ---- routing -----------------------------------------------------------------------------
    @classmethod
    def route(cls, router_logits: torch.Tensor, top_k: int, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's own top-k rule: (weights [tokens, k], expert indices [tokens, k])."""
        raise CheckpointError(f"{cls.name} models have no router")

    # ---- routing interventions (the causal checks) --------------------------------------------
    @classmethod
    def topk_renormalized(cls, config: dict) -> bool:
        """Whether the family rescales its chosen experts' weights to sum to 1 (`norm_topk_prob`;
        Mixtral always: a softmax over the chosen logits)."""
        return bool(config.get("norm_topk_prob", False))

    @classmethod
    def weigh(cls, router_logits: torch.Tensor, experts: torch.Tensor, config: dict,
              block: torch.nn.Module | None = None) -> torch.Tensor:
        """The weights the family's rule gives a chosen set of experts [tokens, k] (norm routing: a
        choice other than the gate's): the softmax-over-all probabilities of the chosen experts,
        renormalised over them where the family renormalises (`topk_renormalized`). `route` is
        `weigh` applied to the gate's own choice (tested for every family)."""
        weights = torch.softmax(router_logits.float(), dim=-1).gather(-1, experts.long())
        if cls.topk_renormalized(config):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights

    @classmethod
    def route_without(cls, router_logits: torch.Tensor, removed: torch.Tensor, top_k: int, config: dict,
                      block: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's rule on the model with the experts `removed` ([tokens, E] bool) deleted, as if
        their router rows were gone: their logits are -inf, so the rule picks among the others and
        normalises over them as it always does (a softmax over the remaining experts; over the chosen
        ones where the family renormalises its top-k)."""
        return cls.route(router_logits.float().masked_fill(removed, float("-inf")), top_k, config)

    @classmethod
    def intervention_semantics(cls, config: dict) -> dict[str, str]:
        """What norm routing and an ablation mean for this family, in words (stored with the results)."""
        renorm = cls.topk_renormalized(config)
        return {
            "norm_routing": "each token's top-k experts by the L2 norm of their outputs (Topk = ALL) instead of "
                            "the gate's; their weights are the router's softmax-over-all probabilities of those "
                            "experts" + (", renormalised to sum 1 as the family renormalises its top-k" if renorm
                                         else ", not renormalised (the family does not renormalise its top-k)"),
            "ablation": "the expert's router row deleted: the family's rule over the remaining experts, i.e. a "
                        "softmax over them, their top-k" + (", weights renormalised over the chosen k" if renorm
                                                            else ", weights their probabilities among the remaining "
                                                                 "experts (not renormalised over the k)"),
            "shared_expert_ablation": "the shared expert's output (SE) left out, the routed experts unchanged",
        }

    @classmethod
    def shared_expert_module(cls, block: torch.nn.Module) -> torch.nn.Module | None:
        """The module computing a built MoE block's shared expert (SE), whose output an ablation of
        SE leaves out; None where the family has none."""
        return None

    # ---- output head (next-token loss) --------------------------------------------------------
    final_norm_key: ClassVar[str] = "model.norm.weight"
    """The final RMSNorm's weight, applied to the last layer's output before the output head."""

    @classmethod
    def output_head_key(cls, config: dict) -> str:
        """The output projection [vocab, H]: `lm_head.weight`, or the embeddings where tied."""
        return "model.embed_tokens.weight" if config.get("tie_word_embeddings", False) else "lm_head.weight"

    @classmethod
    def output_scale(cls, config: dict) -> float:
        """What the output logits are multiplied by (1 for most models)."""
        return 1.0

    @classmethod
    def final_norm(cls, hidden: torch.Tensor, weight: torch.Tensor, config: dict) -> torch.Tensor:
        """The final norm: RMSNorm, y = weight · x / sqrt(mean(x²) + rms_norm_eps), normalised in float32."""
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + float(config.get("rms_norm_eps", 1e-6)))
        return weight * x.to(hidden.dtype)

    # ---- full-model layout (make-tiny, plan, meta-device skeletons) --------------------------
    @classmethod
    def tensor_shapes(cls, config: dict) -> dict[str, tuple[int, ...]]:
        """Every tensor of the whole model, by hub key, with its shape (each family defines it)."""
        raise TypeError(f"{cls.__name__} does not define its tensor layout")

    @classmethod
    def tiny_config(cls) -> dict:
        """config.json of the tiny flavor that `make-tiny` builds (each family defines it)."""
        raise TypeError(f"{cls.__name__} does not define a tiny flavor")

    flavors: ClassVar[dict[str, dict]] = {}
    """Published configs of real checkpoints (for `plan` and meta-device tests), by flavor name."""

    # ---- dynamic passes: decoder layers (transformers' own classes, or moe_ray.models) -------
    hf_module: ClassVar[str | None] = None
    """`transformers.models.<hf_module>.modeling_<hf_module>` holds the decoder classes (None: none)."""
    hf_prefix: ClassVar[str] = ""
    """Class-name prefix there, e.g. "Mixtral" for MixtralDecoderLayer, MixtralConfig."""
    own_module: ClassVar[str | None] = None
    """`moe_ray.models.<own_module>` holds our compact decoder layer where transformers has none."""
    moe_hub_name: ClassVar[str] = "mlp"
    """What the hub keys call a layer's MoE block (the decoder modules always call it `mlp`)."""

    @classmethod
    def decoder_classes(cls) -> dict[str, type] | None:
        """The config, decoder-layer and rotary-embedding classes dynamic passes build this family
        from, or None where moe-ray has no decoder for it."""
        import importlib

        if cls.own_module is not None:
            own = importlib.import_module(f"moe_ray.models.{cls.own_module}")
            return {"config": own.Config, "layer": own.DecoderLayer, "rotary": own.RotaryEmbedding}
        if cls.hf_module is None:
            return None
        modeling = importlib.import_module(f"transformers.models.{cls.hf_module}.modeling_{cls.hf_module}")
        config_mod = importlib.import_module(f"transformers.models.{cls.hf_module}.configuration_{cls.hf_module}")
        p = cls.hf_prefix
        return {"config": getattr(config_mod, f"{p}Config"), "layer": getattr(modeling, f"{p}DecoderLayer"),
                "rotary": getattr(modeling, f"{p}RotaryEmbedding")}

    @classmethod
    def decoder_config(cls, config: dict):
        """config.json as the decoder's config object: SDPA attention, the eager (per-expert) MoE
        path, and `moe_layers` (this adapter's rule) for decoders that need to be told."""
        classes = cls.decoder_classes()
        if classes is None:
            raise CheckpointError(f"dynamic passes are not available for {cls.name} models")
        hf = classes["config"](**{k: v for k, v in config.items() if k != "torch_dtype"})
        hf._attn_implementation = "sdpa"
        hf._experts_implementation = "eager"
        hf.moe_layers = list(cls.facts(config).moe_layers)
        return hf

    @classmethod
    def embedding_scale(cls, config: dict) -> float:
        """What the token embeddings are multiplied by before the first layer (1 for most models)."""
        return 1.0

    @classmethod
    def layer_state(cls, module_keys: list[str], layer: int, num_experts: int, read) -> dict[str, torch.Tensor]:
        """A decoder layer's state dict from hub tensors (`read(key)`): per-expert W_gate/W_up/W_down
        are fused into transformers' `mlp.experts.gate_up_proj` [E, 2·d_mid, H] (gate rows first) and
        `mlp.experts.down_proj` [E, H, d_mid]; every other parameter keeps its hub name, with the
        MoE block's `mlp.` spelled as the hub spells it."""
        state: dict[str, torch.Tensor] = {}
        experts = [cls.expert_keys(layer, e) for e in range(num_experts)]
        for name in module_keys:
            if name == "mlp.experts.gate_up_proj":
                state[name] = fill_stack([(k["gate"], k["up"]) for k in experts], read)
            elif name == "mlp.experts.down_proj":
                state[name] = fill_stack([(k["down"],) for k in experts], read)
            else:
                hub = name
                if num_experts and name.startswith("mlp."):
                    hub = f"{cls.moe_hub_name}." + name[len("mlp."):]
                state[name] = read(f"model.layers.{layer}.{hub}")
        return state

    @classmethod
    def expert_stacks(cls, block: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_gate, W_up [E, d_mid, H], W_down [E, H, d_mid]) of a built MoE block, views of its weights."""
        gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
        d_mid = down.shape[-1]
        return gate_up[:, :d_mid], gate_up[:, d_mid:], down

    @classmethod
    def router_weight(cls, block: torch.nn.Module) -> torch.Tensor:
        """The router matrix [E, H] of a built MoE block."""
        return block.gate.weight

    @classmethod
    def shared_expert_stack(cls, block: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(W_gate, W_up, W_down) of the block's shared expert as a one-expert stack, or None."""
        return None


# ---- helpers shared by llama-style families --------------------------------------------------

def fill_stack(keys: list[tuple[str, ...]], read) -> torch.Tensor:
    """[len(keys), rows, cols]: entry i is the tensors named by keys[i] concatenated along rows.
    Filled in place, one tensor read at a time, so a layer never exists twice in memory."""
    first = read(keys[0][0])
    rows = first.shape[0] * len(keys[0])
    stack = first.new_empty((len(keys), rows, first.shape[1]))
    for i, names in enumerate(keys):
        at = 0
        for name in names:
            t = first if (i, at) == (0, 0) else read(name)
            stack[i, at:at + t.shape[0]] = t
            at += t.shape[0]
    return stack


def mlp_as_stack(mlp: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gated MLP module (gate_proj, up_proj, down_proj) as a one-expert (W_gate, W_up, W_down) stack."""
    return mlp.gate_proj.weight[None], mlp.up_proj.weight[None], mlp.down_proj.weight[None]


def softmax_then_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the top-k probabilities (optionally renormalised to sum 1)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def llama_attention_shapes(config: dict, prefix: str, bias: bool = False) -> dict[str, tuple[int, ...]]:
    """q/k/v/o projections of a llama-style attention block under `prefix` (e.g. ...self_attn)."""
    h = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or h // n_heads)
    shapes = {
        f"{prefix}.q_proj.weight": (n_heads * head_dim, h),
        f"{prefix}.k_proj.weight": (n_kv * head_dim, h),
        f"{prefix}.v_proj.weight": (n_kv * head_dim, h),
        f"{prefix}.o_proj.weight": (h, n_heads * head_dim),
    }
    if bias:
        shapes[f"{prefix}.q_proj.bias"] = (n_heads * head_dim,)
        shapes[f"{prefix}.k_proj.bias"] = (n_kv * head_dim,)
        shapes[f"{prefix}.v_proj.bias"] = (n_kv * head_dim,)
    return shapes


def mlp_shapes(keys: dict[str, str], d_mid: int, d_hid: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one gated MLP given its keys by matrix name: W_up, W_gate [d_mid, d_hid], W_down [d_hid, d_mid]."""
    return {keys["up"]: (d_mid, d_hid), keys["gate"]: (d_mid, d_hid), keys["down"]: (d_hid, d_mid)}


def llama_model_shapes(family: type[Family], config: dict, attn_bias: bool = False,
                       extra_layer: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    """The full tensor layout of a llama-style decoder whose MLPs follow `family`'s key tables."""
    h, v = int(config["hidden_size"]), int(config["vocab_size"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    facts = family.facts(config)
    for layer in range(facts.num_layers):
        p = f"model.layers.{layer}"
        shapes.update(llama_attention_shapes(config, f"{p}.self_attn", bias=attn_bias))
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        for key, shape in (extra_layer or {}).items():
            shapes[key.format(layer=layer)] = shape
        if layer in facts.moe_layers:
            shapes[family.router_weight_key(layer)] = (facts.num_experts, h)
            for e in range(facts.num_experts):
                shapes.update(mlp_shapes(family.expert_keys(layer, e), facts.d_mid, h))
            shared = family.shared_expert_keys(layer)
            if shared is not None and facts.shared_d_mid:
                shapes.update(mlp_shapes(shared, facts.shared_d_mid, h))
        else:
            d_dense = facts.dense_d_mid or int(config["intermediate_size"])
            shapes.update(mlp_shapes(family.dense_ffn_keys(layer), d_dense, h))
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def llama_tiny_base(**overrides: Any) -> dict:
    """Common fields of every tiny llama-style config (small enough for a test, real in shape)."""
    cfg = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg.update(overrides)
    return cfg
