"""Pure math of the dynamic analyses (paper §5, App D, App E): what a forced all-expert pass computes
from one MoE layer's input x and the layer's weights. Torch only; no Ray, no Zarr.

Shapes: x [T, H] (T tokens), stacked expert weights W_gate, W_up [E, d_mid, H] and W_down [E, H, d_mid];
expert outputs [T, L, H] over L labels (routed experts, then F and SE where present).

- D1 (§5.1, Fig 2): `cosine_per_token`, cosine between every pair of expert outputs, per token.
- D2 (§5.1, Fig 3): `angular_mean`, 1 - arccos(cos)/π averaged over tokens.
- D3 (§5.2, Fig 4, App D Fig 9): `output_norms`, `router_scores` and `norm_score_rank_counts`.
- D4 (§5.3, Fig 5): `all_expert_forward` returns the fraction of act(W_gate x) elements with
  |value| > threshold per token and expert, and the full vectors for the first few tokens.
- D5 (App E, Fig 10): the family's own top-k (in the family adapters' `route`) beside the scores.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVE_THRESHOLD = 1e-3
"""|act(W_gate x)| above this counts as an activated neuron (paper §5.3)."""

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": lambda t: F.gelu(t, approximate="none"),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The expert activation named by a family adapter (`Family.activation`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}") from None


def clamped_swiglu(alpha: float, limit: float) -> tuple[Callable, Callable]:
    """gpt-oss's expert activation as (act, combine): act(g) = min(g, limit)·sigmoid(alpha·min(g, limit))
    and the intermediate state act(g)·(clamp(u, -limit, limit) + 1)."""
    def act(g: torch.Tensor) -> torch.Tensor:
        g = g.clamp(max=limit)
        return g * torch.sigmoid(alpha * g)

    def combine(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return a * (u.clamp(-limit, limit) + 1)

    return act, combine


@dataclass
class AllExpertResult:
    """Every expert applied to every token of one layer's input."""

    outputs: torch.Tensor  # [T, E, H]: W_down (act(W_gate x) * W_up x), unweighted by the router
    activation_ratio: torch.Tensor  # [T, E]: fraction of |act(W_gate x)| > threshold
    intermediate: torch.Tensor  # [P, E, d_mid]: act(W_gate x) of the first P tokens


def all_expert_forward(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                       act: Callable[[torch.Tensor], torch.Tensor], probe_tokens: int = 0,
                       threshold: float = ACTIVE_THRESHOLD, chunk: int = 512,
                       combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                       biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> AllExpertResult:
    """Run all E experts on all T tokens (Topk = ALL, §5): batched over experts, in token blocks
    of `chunk` so the [chunk, E, d_mid] intermediates bound the memory (no loop over experts or tokens).

    An expert is W_down · combine(act(W_gate x + b_gate), W_up x + b_up) + b_down; without `combine`
    the product, without `biases` none (gpt-oss has both)."""
    T = x.shape[0]
    E, d_mid, H = gate.shape
    outputs = x.new_empty((T, E, H))
    ratio = x.new_empty((T, E))
    probe = min(probe_tokens, T)
    intermediate = x.new_empty((probe, E, d_mid))
    gate_flat, up_flat = gate.reshape(E * d_mid, H).T, up.reshape(E * d_mid, H).T  # one matmul for all experts
    down_t = down.transpose(1, 2)  # [E, d_mid, H]
    for start in range(0, T, chunk):
        xs = x[start:start + chunk]
        g_pre, u = (xs @ gate_flat).reshape(-1, E, d_mid), (xs @ up_flat).reshape(-1, E, d_mid)
        if biases is not None:
            g_pre, u = g_pre + biases[0], u + biases[1]
        g = act(g_pre)
        mid = g * u if combine is None else combine(g, u)
        out = torch.bmm(mid.transpose(0, 1), down_t).transpose(0, 1)
        outputs[start:start + chunk] = out if biases is None else out + biases[2]
        ratio[start:start + chunk] = (g.abs() > threshold).float().mean(dim=-1)
        if start < probe:
            intermediate[start:probe] = g[: probe - start]
    return AllExpertResult(outputs, ratio, intermediate)


def cosine_per_token(outputs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """D1: [T, L, H] -> [T, L, L] float64, the cosine between every pair of labels' outputs per token
    (in float64: arccos near cos = 1 turns float32 rounding into visible angular error)."""
    out = outputs.double()
    unit = out / out.norm(dim=-1, keepdim=True).clamp_min(eps)
    return unit @ unit.transpose(1, 2)


def angular_similarity(cos: torch.Tensor) -> torch.Tensor:
    """D2: 1 - arccos(cos)/π, in [0, 1] (1 for parallel, 0.5 for orthogonal outputs)."""
    return 1.0 - torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def angular_mean(cos: torch.Tensor) -> torch.Tensor:
    """D2: [T, L, L] per-token cosines -> [L, L] angular similarity averaged over tokens."""
    return angular_similarity(cos.double()).mean(dim=0)


def output_norms(outputs: torch.Tensor) -> torch.Tensor:
    """D3: [T, L, H] -> [T, L], the L2 norm of each label's output."""
    return outputs.norm(dim=-1)


def router_scores(logits: torch.Tensor) -> torch.Tensor:
    """D3: the router's score of every expert, softmax over all experts (whatever the family's top-k rule)."""
    return torch.softmax(logits.float(), dim=-1)


def descending_ranks(values: torch.Tensor) -> torch.Tensor:
    """[T, E] -> [T, E] ranks per token, 0 for the largest value (ties broken by expert index)."""
    order = torch.argsort(values, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(values.shape[-1]).expand_as(order).contiguous())
    return ranks


def norm_score_rank_counts(norms: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """D3 (App D, Fig 9): [E, E] counts over tokens and experts of (norm rank, score rank) pairs.

    Entry [i, j] counts the (token, expert) pairs where the expert has the i-th largest output norm
    and the j-th largest router score; a router that prefers large-norm experts gives a diagonal.
    """
    E = norms.shape[-1]
    flat = descending_ranks(norms).reshape(-1) * E + descending_ranks(scores).reshape(-1)
    return torch.bincount(flat, minlength=E * E).reshape(E, E)
