"""What-if passes on a layer range (the causal checks, beyond the paper): rows of a batch that route
differently, and the next-token loss at the output head.

A batch holds one sequence several times: row 0 runs the model as it is; every other row is a
`Variant` that changes the routing of one MoE layer (route by expert output norm, or remove one expert,
or the shared expert) or of every analysed MoE layer (norm routing throughout). A variant's row is
created at the layer it changes, as a copy of row 0's input to that layer, so the layers before it run
once for all variants: the prefix is computed once per sequence and held in memory for the length of
one pass (`run_rows`). Rows are independent: a layer is applied to the whole batch, and forward hooks
on each MoE block's `experts` module replace the routing of the rows that change it there.

Every routing rule is the family adapter's (`Family.route`, `route_without`, `weigh`), applied to the
router logits of the very input the block sees; the block itself then computes the chosen experts and
combines them (and its shared expert) exactly as the model does.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..analysis import causal as C
from ..analysis import dynamic as D
from ..checkpoint import Checkpoint
from .layers import LayerCapture, LayerRange

SHARED = "SE"
"""The shared expert's label (an ablation variant's `expert`)."""

LOGIT_ELEMENTS = 1 << 25
"""Output-head logits computed at once (128 MiB of float32): tokens per block = this // vocab."""


@dataclass(frozen=True)
class Variant:
    """One intervention, one row of a batch: `norm` (layer `layer` routes by expert output norm),
    `norm_all` (every analysed MoE layer does, from `layer`, the first, on) or `ablate` (expert `expert`,
    a routed expert's index as a string or "SE", removed from layer `layer`'s routing)."""

    kind: str
    layer: int
    expert: str | None = None

    def acts_at(self, layer: int, moe_layers: Sequence[int]) -> bool:
        if self.kind == "norm_all":
            return layer in moe_layers and layer >= self.layer
        return layer == self.layer


@dataclass
class LayerActions:
    """What each row of a batch [R, T, H] does at one MoE layer."""

    by_norm: torch.Tensor  # [R] bool: top-k by expert output norm
    removed: torch.Tensor  # [R] int64: routed expert removed, -1 for none
    drop_shared: torch.Tensor  # [R] bool: the shared expert's output left out

    @classmethod
    def of(cls, rows: Sequence[Variant | None], layer: int, moe_layers: Sequence[int]) -> "LayerActions":
        """Row r's action at `layer` (None rows and variants of other layers do nothing there)."""
        acting = [v if v is not None and v.acts_at(layer, moe_layers) else None for v in rows]
        by_norm = torch.tensor([v is not None and v.kind in ("norm", "norm_all") for v in acting])
        removed = torch.tensor([int(v.expert) if v is not None and v.kind == "ablate" and v.expert != SHARED
                                else -1 for v in acting], dtype=torch.long)
        drop = torch.tensor([v is not None and v.kind == "ablate" and v.expert == SHARED for v in acting])
        return cls(by_norm, removed, drop)

    def reroutes(self) -> bool:
        return bool(self.by_norm.any() or (self.removed >= 0).any())


def expert_outputs(runner: LayerRange, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every routed expert applied to x [N, H] (Topk = ALL): [N, E, H], as the capture computes them."""
    return runner.routed_experts(block, x).outputs


def reroute(runner: LayerRange, block: torch.nn.Module, x: torch.Tensor, index: torch.Tensor,
            weights: torch.Tensor, actions: LayerActions, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's routing (index, weights [N, k] for x [N, H], N = rows x tokens) with the rows that
    act here rerouted by the family's rule: without their removed expert, or by output norm."""
    family, config, k = runner.family, runner.ckpt.config, index.shape[-1]
    row_of = torch.arange(x.shape[0], device=x.device) // tokens
    removed = actions.removed.to(x.device)[row_of]
    by_norm = actions.by_norm.to(x.device)[row_of]
    logits = family.router_logits(block, x).float()
    index, weights = index.clone(), weights.clone()
    sel = removed >= 0
    if sel.any():
        gone = torch.zeros(int(sel.sum()), logits.shape[-1], dtype=torch.bool, device=x.device)
        gone[torch.arange(gone.shape[0], device=x.device), removed[sel]] = True
        w, i = family.route_without(logits[sel], gone, k, config, block=block)
        index[sel], weights[sel] = i.to(index.dtype), w.to(weights.dtype)
    if by_norm.any():
        norms = D.output_norms(expert_outputs(runner, block, x[by_norm]))
        chosen = C.topk_by_norm(norms, k)
        index[by_norm] = chosen.to(index.dtype)
        weights[by_norm] = family.weigh(logits[by_norm], chosen, config, block=block).to(weights.dtype)
    return index, weights


@contextmanager
def routing_hooks(runner: LayerRange, layer: int, actions: LayerActions, tokens: int) -> Iterator[None]:
    """While active, layer `layer`'s MoE block routes each row as `actions` say: the family's reroute
    hook (`Family.reroute_hook`) replaces the (index, weights) the block's router chose, a hook on its
    shared expert zeroes the rows that leave it out."""
    block = runner.family.moe_block(runner.layers[layer])
    handles = []
    if actions.reroutes():
        handles.append(runner.family.reroute_hook(
            block, lambda x, index, weights: reroute(runner, block, x, index, weights, actions, tokens)))
    if actions.drop_shared.any():
        shared = runner.family.shared_expert_module(block)
        if shared is None:
            raise ValueError(f"layer {layer} of this {runner.family.name} model has no shared expert to remove")

        def post(_module, _args, output):
            rows = actions.drop_shared.to(output.device)  # blocks call it on [R, T, H] or on [R * T, H]
            if output.shape[0] != rows.shape[0]:
                rows = rows.repeat_interleave(tokens)
            return output.masked_fill(rows.view(-1, *([1] * (output.dim() - 1))), 0)
        handles.append(shared.register_forward_hook(post))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_rows(runner: LayerRange, hidden: torch.Tensor, rows: list[Variant | None],
             new_rows: dict[int, list[Variant]], moe_layers: Sequence[int], capture: Sequence[int] = (),
             start: int | None = None) -> tuple[torch.Tensor, list[Variant | None], dict[int, LayerCapture]]:
    """Run this range's layers (from layer `start` on, if given) on a batch [R, T, H] whose row 0 is the
    unmodified model (`rows[0]` None).

    Before layer l, the variants `new_rows[l]` join the batch as copies of row 0's input to l; every
    row then routes at l as its variant says. `capture` layers also return row 0's all-expert capture
    (D1-D5 of the unmodified model, `LayerRange.capture`). Returns the batch after the range's last
    layer, the rows it holds, and the captures."""
    hidden = hidden.to(device=runner.device, dtype=runner.dtype)
    T = hidden.shape[1]
    rows = list(rows)
    positions = runner.positions(hidden)
    captures: dict[int, LayerCapture] = {}
    with torch.no_grad():
        for layer in runner.layers:
            if start is not None and layer < start:
                continue
            if new_rows.get(layer):
                fresh = new_rows[layer]
                hidden = torch.cat([hidden, hidden[:1].expand(len(fresh), -1, -1)])
                rows += fresh
            actions = LayerActions.of(rows, layer, moe_layers)
            seen: list[torch.Tensor] = []
            hook = None
            if layer in capture:
                hook = runner.family.moe_block(runner.layers[layer]).register_forward_pre_hook(
                    lambda _m, args: seen.append(args[0][0].detach()))
            try:
                with routing_hooks(runner, layer, actions, T):
                    hidden = runner.run_layer(layer, hidden, positions)
            finally:
                if hook is not None:
                    hook.remove()
            if seen:
                captures[layer] = runner.capture(layer, seen[0].reshape(T, -1), 0)
    return hidden, rows, captures


class OutputHead:
    """The final norm and output projection of a model (the family adapter says where they are and how
    the logits are scaled), on one device: next-token losses of a batch's rows. It computes in float32
    whatever the layers' dtype (the losses are differenced: bfloat16 logits would bury small changes)."""

    def __init__(self, ckpt: Checkpoint, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        family, config = ckpt.family, ckpt.config
        self.family, self.config = family, config
        self.device, self.dtype = torch.device(device), dtype
        self.norm_weight = ckpt.read(family.final_norm_key(), dtype=dtype, device=self.device)
        self.weight = ckpt.read(family.output_head_key(config), dtype=dtype, device=self.device)
        self.scale = family.output_scale(config)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output logits (float32) of hidden states [..., H] after the model's last layer."""
        normed = self.family.final_norm(hidden.to(device=self.device, dtype=self.dtype), self.norm_weight, self.config)
        logits = (normed @ self.weight.T).float()
        return logits * self.scale if self.scale != 1.0 else logits

    def nll(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[R] float64: each row's next-token loss summed over the sequence (hidden [R, T, H], ids [T]),
        the logits made a block of tokens at a time."""
        ids = ids.to(self.device)
        T = hidden.shape[1]
        block = max(1, LOGIT_ELEMENTS // self.weight.shape[0])
        out = torch.zeros(hidden.shape[0], dtype=torch.float64)
        with torch.no_grad():
            for r in range(hidden.shape[0]):
                for start in range(0, T - 1, block):
                    stop = min(start + block, T - 1)
                    logits = self.logits(hidden[r, start:stop])
                    out[r] += C.token_nll(logits, ids[start + 1:stop + 1]).sum().cpu()
        return out
