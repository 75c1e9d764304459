"""What every model family adapter provides, and the pieces most families share.

A family adapter is data first: key templates, the activation, the routing rule and which layers
are MoE. Everything family-specific lives in one adapter module; nothing else in moe-ray branches
on the family name. Experts stored fused (one 3-D tensor per layer) are named by `TensorRef`s, so
every consumer reads one expert's matrix the same way whatever the layout; how each tensor is stored
on disk (float, FP8 blocks, MXFP4) is the adapter's `storage` and the reader's `checkpoint.quant`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Union

from ...lazy import torch  # imported on first use (moe-ray plan needs none)

from ...errors import CheckpointError
from ..quant import TORCH_NAMES, fp8_block_size, stored_parts

MATRICES: tuple[str, ...] = ("up", "gate", "down")
"""The three expert matrices, in the store's `matrix` coordinate order."""

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")

Index = Union[int, tuple]
"""One dimension of a `TensorRef` index: an int; (start, stop, step) with None for open ends; or
("chunk", i, n), the i-th of n equal parts of the dimension (an adapter's key tables need no sizes)."""


@dataclass(frozen=True)
class TensorRef:
    """A piece of a logical tensor, `name[index]`, transposed if asked: how an adapter names one
    expert's matrix inside a fused 3-D tensor (Llama 4, gpt-oss), so that it is read by slice, one
    expert and one matrix at a time, never the whole tensor. `Checkpoint.read/info/require/prefetch`
    take a TensorRef wherever they take a key."""

    name: str
    index: tuple[Index, ...] = ()
    transpose: bool = False

    def torch_index(self, full: tuple[int, ...]) -> tuple:
        """The index as ints and slices, for a logical tensor of shape `full`."""
        def one(i: Index, size: int):
            if isinstance(i, int):
                return i
            if i and i[0] == "chunk":
                part = size // i[2]
                return slice(i[1] * part, (i[1] + 1) * part)
            return slice(*i)
        return tuple(one(i, size) for i, size in zip(self.index, full))

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        """The shape this piece has, given the whole logical tensor's shape."""
        index = self.torch_index(full)
        out = []
        for dim, size in enumerate(full):
            if dim >= len(index):
                out.append(size)
            elif isinstance(index[dim], slice):
                out.append(len(range(*index[dim].indices(size))))
        if self.transpose:
            out[-2:] = out[-2:][::-1]
        return tuple(out)

    def __str__(self) -> str:
        def one(i: Index) -> str:
            if isinstance(i, int):
                return str(i)
            if i and i[0] == "chunk":
                return f"part {i[1] + 1} of {i[2]}"
            start, stop, step = (list(i) + [None, None, None])[:3]
            text = f"{'' if start is None else start}:{'' if stop is None else stop}"
            return text + (f":{step}" if step not in (None, 1) else "")
        index = f"[{', '.join(one(i) for i in self.index)}]" if self.index else ""
        return f"{self.name}{index}{'.T' if self.transpose else ''}"


Key = Union[str, TensorRef]


def ref_name(key: Key) -> str:
    """The logical tensor a key or TensorRef reads from."""
    return key.name if isinstance(key, TensorRef) else key


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
    mtp_layers: tuple[int, ...] = ()
    """Layers outside the main stack that carry experts (DeepSeek-V3's multi-token-prediction layer),
    analysed only on request (spec field `mtp`)."""
    stored_format: str = ""
    """How the expert weights are stored on disk (e.g. BF16, FP8 E4M3 with 128x128 block scales)."""
    expert_biases: str = ""
    """How expert and router biases are treated, where a family has them (gpt-oss)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        d["mtp_layers"] = list(self.mtp_layers)
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
    key_prefix: ClassVar[str] = "model."
    """What every hub key of the language model starts with (Llama 4: "language_model.model.")."""
    expert_biases: ClassVar[str] = ""
    """How the family's expert/router biases are treated, where it has them (recorded in stores)."""

    # ---- facts -------------------------------------------------------------------------------
    @classmethod
    def text_config(cls, config: dict) -> dict:
        """The language model's config inside config.json (multimodal models nest it)."""
        return config

    @classmethod
    def mtp_layers(cls, config: dict) -> tuple[int, ...]:
        """Expert-carrying layers outside the main stack (multi-token prediction), if any."""
        return ()

    @classmethod
    def stored_format(cls, config: dict) -> str:
        """How the expert weights are stored, from config.json (the reader checks the headers)."""
        return str(cls.text_config(config).get("torch_dtype") or config.get("torch_dtype") or "bfloat16")

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
        full, config = config, cls.text_config(config)
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
            mtp_layers=cls.mtp_layers(config),
            stored_format=cls.stored_format(full),
            expert_biases=cls.expert_biases,
        )

    # ---- key names ---------------------------------------------------------------------------
    @classmethod
    def layer_prefix(cls, layer: int) -> str:
        """What every hub key of decoder layer `layer` starts with."""
        return f"{cls.key_prefix}layers.{layer}."

    @classmethod
    def embed_key(cls) -> str:
        return f"{cls.key_prefix}embed_tokens.weight"

    @classmethod
    def lm_head_key(cls) -> str:
        return "lm_head.weight"

    @classmethod
    def is_language_model_key(cls, key: str) -> bool:
        """Whether a hub key belongs to the language model (not a vision tower or projector)."""
        return key.startswith(cls.key_prefix) or key == cls.lm_head_key()

    @classmethod
    def router_weight_key(cls, layer: int) -> str:
        return cls.router_key.format(layer=layer)

    @classmethod
    def expert_keys(cls, layer: int, expert: int) -> dict[str, Key]:
        """Where one routed expert's matrices are, by matrix name (up, gate, down), each as the
        logical [d_mid, d_hid] (up, gate) or [d_hid, d_mid] (down) matrix: a hub key, or a TensorRef
        into a fused tensor."""
        return {m: cls.expert_key.format(layer=layer, expert=expert, proj=p) for m, p in cls.expert_proj.items()}

    @classmethod
    def expert_tensor_names(cls, layer: int, config: dict) -> set[str]:
        """The logical tensors holding layer `layer`'s routed experts (make-tiny writes them together)."""
        n = cls.num_experts(cls.text_config(config))
        return {ref_name(k) for e in range(n) for k in cls.expert_keys(layer, e).values()}

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
    def route(cls, router_logits: torch.Tensor, top_k: int, config: dict,
              block: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's own top-k rule: (weights [tokens, k], expert indices [tokens, k]). `block`
        is the built MoE block, for rules that use more than the logits (DeepSeek-V3's bias).
        Here the common rule: a softmax over all experts, the k largest, renormalised over them
        where the family renormalises (`topk_renormalized`)."""
        if cls.router_key is None:
            raise CheckpointError(f"{cls.name} models have no router")
        return softmax_then_topk(router_logits, top_k, renormalize=cls.topk_renormalized(config))

    @classmethod
    def router_logits(cls, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The router's logits [tokens, E] for a built MoE block's input x [tokens, H]."""
        return x @ cls.router_weight(block).T

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
        return cls.route(router_logits.float().masked_fill(removed, float("-inf")), top_k, config, block=block)

    @classmethod
    def reroute_hook(cls, block: torch.nn.Module, reroute):
        """Make a built MoE block take its routing from `reroute(x [N, H], index [N, k], weights [N, k])
        -> (index, weights)`, called with its input and its router's own choice; the block then computes
        and combines the chosen experts (and its shared expert) as the model does. Returns the hook's
        handle. Here: a pre-hook on the block's `experts` module, called as experts(x, index, weights)."""
        def pre(_module, args, kwargs):
            x, index, weights = args[0], args[1], args[2]
            index, weights = reroute(x, index, weights)
            return (x, index, weights) + tuple(args[3:]), kwargs
        return block.experts.register_forward_pre_hook(pre, with_kwargs=True)

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
    @classmethod
    def final_norm_key(cls) -> str:
        """The final RMSNorm's weight, applied to the last layer's output before the output head."""
        return f"{cls.key_prefix}norm.weight"

    @classmethod
    def output_head_key(cls, config: dict) -> str:
        """The output projection [vocab, H]: `lm_head_key`, or the embeddings where tied."""
        tied = cls.text_config(config).get("tie_word_embeddings", config.get("tie_word_embeddings", False))
        return cls.embed_key() if tied else cls.lm_head_key()

    @classmethod
    def output_scale(cls, config: dict) -> float:
        """What the output logits are multiplied by (1 for most models)."""
        return 1.0

    @classmethod
    def final_norm(cls, hidden: torch.Tensor, weight: torch.Tensor, config: dict) -> torch.Tensor:
        """The final norm: RMSNorm, y = weight · x / sqrt(mean(x²) + rms_norm_eps), normalised in float32."""
        eps = float(cls.text_config(config).get("rms_norm_eps", 1e-6))
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
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

    @classmethod
    def storage(cls, key: str, config: dict) -> str:
        """The format a logical tensor is stored in on the hub (`checkpoint.quant`): "float" unless
        the family quantises it (DeepSeek-V3's FP8 linear weights, gpt-oss's MXFP4 experts)."""
        return "float"

    @classmethod
    def stored_layout(cls, config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every physical tensor of the hub checkpoint with its shape and stored dtype (scale and
        block companions included): what make-tiny writes and `moe-ray plan` counts on disk."""
        float_dtype = TORCH_NAMES.get(str(config.get("torch_dtype") or "bfloat16"), "BF16")
        block = fp8_block_size(config.get("quantization_config"))
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        for key, shape in cls.tensor_shapes(config).items():
            out.update(stored_parts(key, shape, cls.storage(key, config), float_dtype, block))
        return out

    has_expert_biases: ClassVar[bool] = False
    """Routed experts carry biases (gpt-oss): make-tiny plants them with the experts' matrices."""

    @classmethod
    def neuron_granularity(cls, config: dict) -> int:
        """Neuron permutations that move whole groups of this many neurons (and permute within
        them) leave a quantised checkpoint's blocks intact: make-tiny's `permuted` variant uses
        them so its planted permutations stay exact after quantisation."""
        return 1

    @classmethod
    def fuse_experts(cls, config: dict, layer: int, experts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One layer's experts (logical matrices by name, from make-tiny) as the hub's logical tensors."""
        out: dict[str, torch.Tensor] = {}
        for e, mats in enumerate(experts):
            keys = cls.expert_keys(layer, e)
            out.update({keys[m]: mats[m] for m in keys})
        return out

    # ---- dynamic passes: decoder layers (transformers' own classes, or moe_ray.models) -------
    hf_module: ClassVar[str | None] = None
    """`transformers.models.<hf_module>.modeling_<hf_module>` holds the decoder classes (None: none)."""
    hf_prefix: ClassVar[str] = ""
    """Class-name prefix there, e.g. "Mixtral" for MixtralDecoderLayer, MixtralConfig."""
    own_module: ClassVar[str | None] = None
    """`moe_ray.models.<own_module>` holds our compact decoder layer where transformers has none."""
    moe_hub_name: ClassVar[str] = "mlp"
    """What the hub keys call a layer's MoE block (the decoder modules always call it `mlp`)."""
    moe_module: ClassVar[str] = "mlp"
    """What the decoder-layer module calls its MoE block (Llama 4: `feed_forward`)."""
    attn_implementation: ClassVar[str] = "sdpa"
    """The attention kernel dynamic passes use (gpt-oss's sinks need "eager")."""
    keep_fp32: ClassVar[tuple[str, ...]] = ()
    """Parameter-name suffixes the model keeps in float32 whatever the compute dtype (routers)."""

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
        skip = ("torch_dtype", "quantization_config")
        hf = classes["config"](**{k: v for k, v in cls.text_config(config).items() if k not in skip})
        hf._attn_implementation = cls.attn_implementation
        hf._experts_implementation = "eager"
        hf.moe_layers = list(cls.facts(config).moe_layers)
        return hf

    @classmethod
    def embedding_scale(cls, config: dict) -> float:
        """What the token embeddings are multiplied by before the first layer (1 for most models)."""
        return 1.0

    @classmethod
    def layer_state(cls, module_keys: list[str], layer: int, num_experts: int, read) -> dict[str, torch.Tensor]:
        """A decoder layer's state dict from hub tensors (`read(key)`): fused expert parameters are
        filled one expert at a time (`fused_sources`); every other parameter keeps its hub name."""
        state: dict[str, torch.Tensor] = {}
        for name in module_keys:
            sources = cls.fused_sources(name, layer, num_experts)
            if sources is not None:
                state[name] = fill_stack(sources, read)
            else:
                state[name] = read(cls.hub_key(name, layer, num_experts))
        return state

    @classmethod
    def fused_sources(cls, name: str, layer: int, num_experts: int) -> list[tuple[Key, ...]] | None:
        """For a fused expert parameter of the decoder module, what fills entry e of it (read and
        concatenated along rows); None for every other parameter. transformers' `gate_up_proj`
        [E, 2·d_mid, H] is W_gate then W_up; `down_proj` [E, H, d_mid] is W_down."""
        if not num_experts:
            return None
        experts = [cls.expert_keys(layer, e) for e in range(num_experts)]
        if name == f"{cls.moe_module}.experts.gate_up_proj":
            return [(k["gate"], k["up"]) for k in experts]
        if name == f"{cls.moe_module}.experts.down_proj":
            return [(k["down"],) for k in experts]
        return None

    @classmethod
    def hub_key(cls, name: str, layer: int, num_experts: int) -> str:
        """The hub key of a decoder-module parameter, the MoE block spelled as the hub spells it."""
        if num_experts and name.startswith(f"{cls.moe_module}."):
            name = f"{cls.moe_hub_name}." + name[len(cls.moe_module) + 1:]
        return cls.layer_prefix(layer) + name

    @classmethod
    def moe_block(cls, layer_module: torch.nn.Module) -> torch.nn.Module:
        """The MoE block of a built decoder layer."""
        return getattr(layer_module, cls.moe_module)

    @classmethod
    def expert_activation(cls, config: dict) -> tuple[Callable, Callable | None]:
        """(act, combine): an expert computes W_down · combine(act(W_gate x), W_up x); combine None is
        the product (SwiGLU/GeGLU). gpt-oss clamps and adds 1 to the up projection."""
        from ...analysis.dynamic import activation_fn

        return activation_fn(cls.activation), None

    @classmethod
    def expert_bias_stacks(cls, block: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(b_gate, b_up [E, d_mid], b_down [E, H]) of a built MoE block whose experts have biases."""
        return None

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

def fill_stack(keys: list[tuple[Key, ...]], read) -> torch.Tensor:
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
    shapes.update(output_shapes(config, h, v))
    return shapes


def output_shapes(config: dict, h: int, v: int) -> dict[str, tuple[int, ...]]:
    """The final norm and, unless the embeddings are tied, the output head of a llama-style model."""
    shapes = {"model.norm.weight": (h,)}
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
