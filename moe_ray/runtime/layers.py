"""A contiguous range of a model's decoder layers, materialised from per-tensor safetensors reads on
its device (a GPU, or the CPU) in its dtype, run with a forced all-expert capture (paper §5).

The decoder layers are the family's own transformers classes (or, for Grok-1 and DeepSeekMoE v1,
the compact ones in `moe_ray.models`), built on the meta device and filled
with `load_state_dict(assign=True)` from the hub tensors (the family adapter fuses per-expert keys
into transformers' 3-D expert tensors). Each MoE layer runs exactly as in the model (top-k) to give
the next layer its input; a forward pre-hook on the MoE block keeps that block's input x, on which
the capture then runs every expert (Topk = ALL), the dense reference FFN F of the same layer and the
shared expert SE. The capture never changes the hidden states that flow on.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..analysis import dynamic as D
from ..checkpoint import Checkpoint
from ..errors import MoeRayError

Stack = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class SequenceError(MoeRayError):
    """An input sequence the model cannot run (empty, longer than its positions)."""


@dataclass
class LayerCapture:
    """Everything the dynamic analyses keep from one MoE layer for one sequence, in float32.

    `outputs` (every label's output vectors) stays on the device the layers run on; what is derived
    from it (`norms`, `similarity`) is computed there and comes to the CPU as the small result it is,
    like every other field. Copying the [T, L, H] outputs to the host was most of a GPU capture pass
    (an H200 at Mixtral's width: 9.6 of 19.9 ms of device time, `benchmarks/profile_dynamic.py`)."""

    layer: int
    router_logits: torch.Tensor  # [T, E]
    gate_scores: torch.Tensor  # [T, E] softmax over all experts
    topk_weights: torch.Tensor  # [T, k] the family's own top-k weights
    topk_experts: torch.Tensor  # [T, k]
    outputs: torch.Tensor  # [T, L, H] over labels (experts, then F, SE), on the layers' device
    activation_ratio: torch.Tensor  # [T, L]
    intermediate: list[torch.Tensor]  # per label: [P, d_mid of that label]

    @cached_property
    def norms(self) -> torch.Tensor:
        return D.output_norms(self.outputs).cpu()

    @cached_property
    def similarity(self) -> torch.Tensor:
        return D.cosine_per_token(self.outputs).cpu()

    @property
    def rank_counts(self) -> torch.Tensor:
        E = self.router_logits.shape[-1]
        return D.norm_score_rank_counts(self.norms[:, :E], self.gate_scores)


def layer_keys(ckpt: Checkpoint, layer: int) -> list[str]:
    """Every logical tensor of one decoder layer (for byte-balanced sharding and presence checks);
    a tensor stored in a format moe-ray cannot read is refused here, before any work starts."""
    prefix = ckpt.family.layer_prefix(layer)
    keys = [k for k in ckpt.stored if k.startswith(prefix)]
    ckpt.require(keys)
    return keys


class LayerRange:
    """Decoder layers [start, end) of `ckpt` (embeddings too when start is 0), ready to run."""

    def __init__(self, ckpt: Checkpoint, start: int, end: int, reference: Checkpoint | None = None,
                 capture_layers: tuple[int, ...] | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.ckpt, self.start, self.end = ckpt, start, end
        self.device, self.dtype = torch.device(device), dtype

        self.family = ckpt.family
        self.facts = ckpt.facts
        keep_fp32 = self.family.keep_fp32

        def read(key, source: Checkpoint = ckpt) -> torch.Tensor:
            # stored bytes go to the device as stored and are converted (dequantised) there
            name = key if isinstance(key, str) else key.name
            want = torch.float32 if any(name.endswith(k) for k in keep_fp32) else dtype
            return source.read(key, dtype=want, device=self.device)

        self.act, self.combine = self.family.expert_activation(ckpt.config)
        self.hf_config = self.family.decoder_config(ckpt.config)
        classes = self.family.decoder_classes()
        self.capture_layers = tuple(l for l in (capture_layers if capture_layers is not None else self.facts.moe_layers)
                                    if start <= l < end)
        self.rotary = classes["rotary"](config=self.hf_config).to(self.device)
        self.embed_weight = read(self.family.embed_key()) if start == 0 else None
        self.embed_scale = self.family.embedding_scale(ckpt.config)
        self.layers: dict[int, torch.nn.Module] = {}
        for layer in range(start, end):
            with torch.device("meta"):
                module = classes["layer"](self.hf_config, layer)
            moe = layer in self.facts.moe_layers
            state = self.family.layer_state(list(module.state_dict()), layer,
                                            self.facts.num_experts if moe else 0, read)
            module.load_state_dict(state, strict=True, assign=True)
            self.layers[layer] = module.eval()
        ckpt.close()
        self.reference: dict[int, Stack] = {}
        if reference is not None:
            for layer in self.capture_layers:
                keys = reference.family.dense_ffn_keys(layer)
                self.reference[layer] = tuple(read(keys[m], reference).unsqueeze(0) for m in ("gate", "up", "down"))
            reference.close()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> hidden states [1, T, H] on this range's device (first shard only)."""
        if self.embed_weight is None:
            raise MoeRayError("embeddings live on the first shard")
        check_sequence(input_ids, self.family.text_config(self.ckpt.config))
        ids = input_ids.long().unsqueeze(0).to(self.device)
        hidden = torch.nn.functional.embedding(ids, self.embed_weight)
        return hidden * self.embed_scale if self.embed_scale != 1.0 else hidden

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, capture: bool = True, probe_tokens: int = 0
                ) -> tuple[torch.Tensor, dict[int, LayerCapture]]:
        """Run this range's layers on [1, T, H] (moved to this range's device and dtype); returns the
        output (on that device) and the MoE layers' captures."""
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        T = hidden.shape[1]
        positions = self.positions(hidden)
        captures: dict[int, LayerCapture] = {}
        for layer, module in self.layers.items():
            seen: list[torch.Tensor] = []
            hook = None
            if capture and layer in self.capture_layers:
                block = self.family.moe_block(module)
                hook = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
            try:
                hidden = self.run_layer(layer, hidden, positions)
            finally:
                if hook is not None:
                    hook.remove()
            if seen:
                captures[layer] = self.capture(layer, seen[0].reshape(T, -1), probe_tokens)
        return hidden, captures

    def positions(self, hidden: torch.Tensor) -> dict:
        """What every layer of one forward pass takes besides the hidden states [B, T, H]: position ids,
        rotary embeddings and causal masks, built for one sequence and broadcast over the batch."""
        one = hidden[:1].to(device=self.device, dtype=self.dtype)
        position_ids = torch.arange(one.shape[1], device=self.device).unsqueeze(0)
        return {"position_ids": position_ids, "position_embeddings": self.rotary(one, position_ids=position_ids),
                "masks": attention_masks(self.hf_config, one, position_ids)}

    def run_layer(self, layer: int, hidden: torch.Tensor, positions: dict) -> torch.Tensor:
        """Decoder layer `layer` on hidden states [B, T, H] (`positions` from `positions`)."""
        mask = positions["masks"][layer_attention_type(self.hf_config, layer)]
        return self.layers[layer](hidden, position_embeddings=positions["position_embeddings"],
                                  attention_mask=mask, position_ids=positions["position_ids"])

    def routed_experts(self, block: torch.nn.Module, x: torch.Tensor, probe_tokens: int = 0) -> D.AllExpertResult:
        """Every routed expert of a built MoE block applied to x [T, H] (Topk = ALL), as the model
        computes an expert (the family's activation, combine and biases)."""
        return D.all_expert_forward(x, *self.family.expert_stacks(block), self.act, probe_tokens,
                                    combine=self.combine, biases=self.family.expert_bias_stacks(block))

    def capture(self, layer: int, x: torch.Tensor, probe_tokens: int) -> LayerCapture:
        """The forced all-expert pass on one MoE layer's input x [T, H] (D1-D5)."""
        block = self.family.moe_block(self.layers[layer])
        logits = self.family.router_logits(block, x)
        weights, experts = self.family.route(logits, self.facts.top_k, self.ckpt.config, block=block)
        routed = self.routed_experts(block, x, probe_tokens)
        outputs, ratios = [routed.outputs], [routed.activation_ratio]
        intermediate = list(routed.intermediate.unbind(1))
        extras = [self.reference.get(layer), self.family.shared_expert_stack(block)]
        for stack in extras:
            if stack is None:
                continue
            res = D.all_expert_forward(x, *stack, self.act, probe_tokens, combine=self.combine)
            outputs.append(res.outputs)
            ratios.append(res.activation_ratio)
            intermediate.append(res.intermediate[:, 0])
        outputs = torch.cat(outputs, dim=1).float()

        def host(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype)
        return LayerCapture(layer, host(logits), host(D.router_scores(logits)), host(weights), host(experts),
                            outputs.detach(), host(torch.cat(ratios, dim=1)), [host(t) for t in intermediate])


def layer_attention_type(hf_config, layer: int) -> str:
    """"full_attention", "sliding_attention" or "chunked_attention": the config's per-layer
    `layer_types` where it has them (Qwen2-MoE, gpt-oss, Llama 4), else sliding everywhere when it
    sets a `sliding_window` (Mixtral, Mistral)."""
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return layer_types[layer]
    return "sliding_attention" if getattr(hf_config, "sliding_window", None) else "full_attention"


def attention_masks(hf_config, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The causal masks the layers need, by attention type, built as the transformers model does."""
    from transformers.masking_utils import (create_causal_mask, create_chunked_causal_mask,
                                            create_sliding_window_causal_mask)

    kwargs = dict(config=hf_config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids)
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if getattr(hf_config, "sliding_window", None):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    if "chunked_attention" in (getattr(hf_config, "layer_types", None) or ()):
        masks["chunked_attention"] = create_chunked_causal_mask(**kwargs)
    return masks


def check_sequence(input_ids: torch.Tensor, config: dict) -> None:
    """Refuse sequences the model cannot run, with one clear line."""
    if input_ids.numel() == 0:
        raise SequenceError("the input has no tokens (empty text)")
    limit = config.get("max_position_embeddings")
    if limit and input_ids.numel() > int(limit):
        raise SequenceError(f"the input has {input_ids.numel()} tokens, more than the model's "
                            f"{limit} positions (max_position_embeddings)")
