"""Causal checks of the paper's claims (beyond the paper): pure math on tensors and arrays.

The paper observes and suggests; these functions turn three of its suggestions into measurements:
- **Norm routing** (§5.2, §5.4 (4), §6 "employing the norm as the routing mechanism is reasonable"):
  `topk_by_norm` picks each token's k experts with the largest output norms; `topk_overlap` counts how
  often that agrees with the gate's own top-k; the loss with norm routing comes from the runtime.
- **Expert ablation**: the next-token loss with one expert removed from routing, as a change of the
  model's loss (`next_token_nll`, `bootstrap_delta`).
- **Weight vs output agreement** (§5.4 (2), §6 "Correlation measurement"): `output_similarity_sums`
  accumulates D1's per-token cosine and D2's angular similarity over a corpus; their means are
  correlated with S1's matrix-level similarity by `analysis.static.upper_triangle_pearson`.

Losses are summed over a sequence's predicted tokens (nats); a corpus's loss is the token-weighted
mean, Σ_s nll_s / Σ_s n_s, and a change of loss Δ = Σ_s (nll'_s - nll_s) / Σ_s n_s, with a percentile
bootstrap interval over sequences (sequences resampled with replacement, the same resamples for every
quantity). No Ray, no Zarr, no model code.
"""
from __future__ import annotations

import numpy as np
import torch

from . import dynamic as D

STATS = ("estimate", "low", "high")
"""What `bootstrap_delta` returns, in this order (the store's `stat` coordinate)."""


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood, nats: -log softmax(logits[..., t, :])[targets[t]] =
    logsumexp(logits_t) - logits_t[targets_t], in float32; logits [..., n, V], targets [n]."""
    logits = logits.float()
    target = targets.to(device=logits.device, dtype=torch.long).expand(logits.shape[:-1]).unsqueeze(-1)
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, target).squeeze(-1)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood, nats: Σ_{t<T-1} -log softmax(logits[..., t, :])[ids[t+1]].

    logits [..., T, V] (any leading batch dims, e.g. one row per intervention), ids [T]; returns [...]
    in float64 (the per-token terms of `token_nll` summed in float64)."""
    if logits.shape[-2] != ids.shape[-1]:
        raise ValueError(f"logits have {logits.shape[-2]} positions, ids {ids.shape[-1]}")
    return token_nll(logits[..., :-1, :], ids[1:]).double().sum(dim=-1)


def topk_by_norm(norms: torch.Tensor, k: int) -> torch.Tensor:
    """[T, E] output norms -> [T, k] the experts with the k largest norms per token, largest first,
    ties broken by the lower expert index (deterministic, unlike torch.topk)."""
    return torch.argsort(norms, dim=-1, descending=True, stable=True)[..., :k]


def topk_overlap(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> tuple[int, int]:
    """How far two per-token expert choices [T, k] agree: (Σ_t |a_t ∩ b_t|, tokens with a_t = b_t as sets)."""
    T = a.shape[0]
    in_a = torch.zeros(T, num_experts, dtype=torch.bool, device=a.device).scatter_(1, a.long(), True)
    in_b = torch.zeros(T, num_experts, dtype=torch.bool, device=b.device).scatter_(1, b.long(), True)
    common = (in_a & in_b).sum(dim=1)
    return int(common.sum()), int((common == a.shape[1]).sum())


def output_similarity_sums(outputs: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """D1 and D2 summed over tokens: (Σ_t cos(o_ti, o_tj), Σ_t (1 - arccos(cos)/π)) [E, E] float64, for
    outputs [T, E, H]; divided by the corpus's token count they are the corpus means. Token blocks of
    `chunk` bound the [chunk, E, E] float64 cosines."""
    E = outputs.shape[1]
    cos_sum = torch.zeros(E, E, dtype=torch.float64)
    ang_sum = torch.zeros(E, E, dtype=torch.float64)
    for start in range(0, outputs.shape[0], chunk):
        cos = D.cosine_per_token(outputs[start:start + chunk]).cpu()
        cos_sum += cos.sum(dim=0)
        ang_sum += D.angular_similarity(cos).sum(dim=0)
    return cos_sum, ang_sum


def resample_counts(sequences: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, sequences]: how often each sequence is drawn in each bootstrap resample (sequences
    drawn with replacement, `sequences` per resample), from a seeded generator."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(sequences, np.full(sequences, 1.0 / sequences), size=resamples)


def bootstrap_delta(intervened: np.ndarray, normal: np.ndarray, tokens: np.ndarray, resamples: int = 1000,
                    seed: int = 0, level: float = 0.95) -> np.ndarray:
    """The change of the corpus's per-token loss, with a percentile bootstrap interval over sequences.

    intervened [..., S] and normal [S]: summed NLL per sequence (nats); tokens [S]: predicted tokens per
    sequence. Returns [..., 3] = (Δ, low, high) (see STATS): Δ = Σ_s (intervened_s - normal_s) / Σ_s
    tokens_s, and the (1-level)/2 and (1+level)/2 quantiles of Δ over `resamples` resamples of the
    sequences (the same resamples for every leading index, so intervals of different interventions are
    comparable). A NaN anywhere in a row (an intervention not computed) gives NaN for that row."""
    intervened = np.asarray(intervened, dtype=np.float64)
    normal = np.asarray(normal, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    S = tokens.shape[-1]
    if normal.shape != (S,) or intervened.shape[-1] != S:
        raise ValueError(f"shapes differ: intervened {intervened.shape}, normal {normal.shape}, tokens {tokens.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), not {level}")
    if S == 0 or tokens.sum() <= 0:
        return np.full(intervened.shape[:-1] + (3,), np.nan)
    diff = (intervened - normal).reshape(-1, S)  # [P, S]
    estimate = diff.sum(axis=1) / tokens.sum()
    counts = resample_counts(S, resamples, seed).astype(np.float64)  # [R, S]
    with np.errstate(invalid="ignore"):
        deltas = (counts @ diff.T) / (counts @ tokens)[:, None]  # [R, P]
        low, high = np.quantile(deltas, [(1 - level) / 2, (1 + level) / 2], axis=0)
    out = np.stack([estimate, low, high], axis=-1)
    out[~np.isfinite(diff).all(axis=1)] = np.nan
    return out.reshape(intervened.shape[:-1] + (3,))


def corpus_loss(nll: np.ndarray, tokens: np.ndarray) -> float:
    """The corpus's loss per predicted token, nats: Σ_s nll_s / Σ_s tokens_s."""
    tokens = np.asarray(tokens, dtype=np.float64)
    return float(np.asarray(nll, dtype=np.float64).sum() / tokens.sum()) if tokens.sum() > 0 else float("nan")
