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


# ---- how many ablations change the loss: one test per (layer, expert), corrected for their number ---------

LOSS_ULPS = 4
"""Float32 steps of a sequence's summed loss within which two losses are the same loss (`loss_resolution`)."""


def loss_resolution(normal: np.ndarray) -> np.ndarray:
    """Per sequence, the smallest change of its summed loss (nats) that the computation resolves. The token
    losses come from float32 logits, so one computation and a minutely different one (an ablated expert that
    no token chose still moves the softmax the family renormalises) differ by a float32 step or two of the
    sequence's loss for no cause worth testing: LOSS_ULPS float32 steps of each sequence's loss."""
    magnitude = np.abs(np.asarray(normal, dtype=np.float64)).astype(np.float32)
    return LOSS_ULPS * np.spacing(magnitude).astype(np.float64)


def paired_t_pvalues(intervened: np.ndarray, normal: np.ndarray,
                     resolution: np.ndarray | float = 0.0) -> np.ndarray:
    """Two-sided p-value of a paired t-test on the per-sequence loss differences d_s = intervened_s - normal_s.

    intervened [..., S] and normal [S]: summed NLL per sequence (nats). H0: E[d_s] = 0, i.e. the intervention
    leaves the corpus's expected loss unchanged; this is the numerator of `bootstrap_delta`'s Δ (Σ d_s / Σ n_s
    is 0 exactly when Σ d_s is), tested with the sequences as the independent units. Why a t-test and not the
    bootstrap: its p-value is a closed form with no resolution floor, while a bootstrap p-value from R
    resamples cannot go below ~1/R, and a corrected threshold such as Holm's α/M is 3e-5 for DeepSeekMoE's
    1,755 ablations (> 10^5 resamples of every test to resolve). The t distribution with S - 1 degrees of
    freedom is exact for normal d_s and, by the central limit theorem over sequences, close for corpora of
    tens of sequences or more. A difference within `resolution` (per sequence [S], or one number; see
    `loss_resolution`) is no difference: without it, two sequences each one float32 step apart would be
    "all equal, no spread" and the t-test certain. Degenerate rows: all d_s equal and non-zero (no spread, so no
    t distribution: sequences sharing their first tokens can change by exactly the same amount) -> the exact
    two-sided sign test's 2^(1 - S), every difference having the same sign; all zero (an expert never routed
    to) -> 1; fewer than 2 sequences, or a NaN (not computed) -> NaN."""
    from scipy import stats

    intervened = np.asarray(intervened, dtype=np.float64)
    normal = np.asarray(normal, dtype=np.float64)
    S = normal.shape[-1]
    if normal.ndim != 1 or intervened.shape[-1] != S:
        raise ValueError(f"shapes differ: intervened {intervened.shape}, normal {normal.shape}")
    diff = (intervened - normal).reshape(-1, S)
    diff[np.abs(diff) <= np.broadcast_to(np.asarray(resolution, dtype=np.float64), (S,))] = 0.0
    p = np.full(diff.shape[0], np.nan)
    if S < 2:
        return p.reshape(intervened.shape[:-1])
    finite = np.isfinite(diff).all(axis=1)
    mean = diff.mean(axis=1)
    spread = np.zeros_like(mean)
    spread[finite] = diff[finite].std(axis=1, ddof=1)
    # equal differences give spread 0 up to rounding (~1e-16 of the mean): no spread, no t distribution
    flat = finite & (spread <= 1e-12 * np.abs(diff).max(axis=1, initial=0.0, where=np.isfinite(diff)))
    p[flat] = np.where(mean[flat] == 0, 1.0, min(1.0, 2.0 ** (1 - S)))
    t_rows = finite & ~flat
    t = mean[t_rows] / (spread[t_rows] / np.sqrt(S))
    p[t_rows] = 2 * stats.t.sf(np.abs(t), df=S - 1)
    return p.reshape(intervened.shape[:-1])


def holm_adjusted(p_values: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values over every finite entry of `p_values` (any shape; NaN stays NaN and is
    not counted as a test): with the M finite p-values sorted, p_(1) <= ... <= p_(M),
    adjusted_(i) = max_{j <= i} min(1, (M - j + 1) p_(j)). A test is rejected at family-wise error rate α
    exactly when its adjusted p-value is <= α (Holm 1979's step-down procedure).

    Why Holm and not Benjamini-Hochberg: every ablation is compared with the same unmodified losses on the same
    sequences, so the tests are dependent in ways the BH guarantee (independence, or positive dependence, which
    two-sided tests on a shared baseline do not assure) does not cover; Holm's holds under any dependence, and
    its statement fits a count: with probability >= 1 - α, every ablation counted changes the loss."""
    p = np.asarray(p_values, dtype=np.float64)
    flat = p.reshape(-1)
    adjusted = np.full(flat.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(flat))
    M = tested.size
    if M == 0:
        return adjusted.reshape(p.shape)
    order = tested[np.argsort(flat[tested], kind="stable")]
    scaled = np.minimum(1.0, (M - np.arange(M)) * flat[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.reshape(p.shape)
