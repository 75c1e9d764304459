"""Static analyses of expert weights (paper §4, App A–C; design §4 S1, S2, S3, S5, S6).

Pure functions on tensors: no Ray, no Zarr, no checkpoint keys. Matrices may be held in their stored
floating dtype (bfloat16, float16) or in float32, on any device (CPU or GPU: every function computes
where its inputs are); reductions over their (possibly 200M) elements are streamed in row blocks,
each block converted to float32 as it is used and accumulated in float64, so a layer's analysis never
makes a second copy of its experts and gives the same numbers whatever dtype they are held in.

Conventions
- A *neuron* i of an expert is (W_up[i, :], W_gate[i, :], W_down[:, i]); each is a d_hid vector.
- "Standardised" means scikit-learn's StandardScaler: per feature, subtract the mean, divide by the
  population standard deviation (features with zero variance become 0).
- PCA signs are fixed so results are reproducible: matrix PCA makes each component's
  largest-magnitude score positive; neuron PCA makes each loading vector's largest-magnitude entry
  positive.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ..lazy import torch  # imported on first use (moe-ray plan needs none)

CHUNK_ELEMENTS = 1 << 20
"""Elements per streamed block on the CPU (4 MiB of float32): small enough that the several passes a
block gets (stack, Gram, centre, scale, Gram) stay in cache, which measured 25-40% faster than 64 MiB
blocks."""
DEVICE_CHUNK_ELEMENTS = 1 << 25
"""Elements per streamed block on a GPU (128 MiB of float32): big enough that kernel launches do not
dominate; a GPU has no cache to fit."""


def chunk_elements(device: torch.device) -> int:
    """Elements per streamed block for data on `device`."""
    return CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS


# ---- helpers -------------------------------------------------------------------------------------

def _row_blocks(mats: Sequence[torch.Tensor]):
    """Yield aligned row blocks of equally shaped 2-D matrices, all of them together about
    `chunk_elements` of their device."""
    rows, cols = mats[0].shape
    step = max(1, chunk_elements(mats[0].device) // max(1, cols * len(mats)))
    for r0 in range(0, rows, step):
        yield [m[r0:r0 + step] for m in mats]


def _stacked_float(block: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row blocks of several matrices flattened into the rows of one float32 matrix (one copy, converted
    from the held dtype on the way)."""
    flat = torch.empty((len(block), block[0].numel()), dtype=torch.float32, device=block[0].device)
    for row, b in zip(flat, block):
        row.copy_(b.reshape(-1))
    return flat


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarity from a Gram matrix of dot products (zero vectors give NaN)."""
    norms = torch.sqrt(torch.diagonal(gram))
    return gram / torch.outer(norms, norms)


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of `vectors` [n, d], in float64."""
    v = vectors.double()
    return cosine_from_gram(v @ v.T)


def _column_signs(columns: torch.Tensor) -> torch.Tensor:
    """±1 per column: the sign of its largest-magnitude entry (1 for an all-zero column)."""
    idx = columns.abs().argmax(dim=0)
    signs = torch.sign(columns[idx, torch.arange(columns.shape[1], device=columns.device)])
    signs[signs == 0] = 1
    return signs


def _fix_signs(columns: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    return columns * _column_signs(columns)


# ---- S1: matrix-level similarity (§4.1.1, Fig 1) -------------------------------------------------

def gram_matrix(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dot products <W_i, W_j> of flattened, equally shaped matrices, streamed, float64 [n, n]."""
    n = len(mats)
    gram = torch.zeros(n, n, dtype=torch.float64, device=mats[0].device)
    for block in _row_blocks(mats):
        flat = _stacked_float(block)
        gram += (flat @ flat.T).double()
    return gram


def matrix_similarity(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """S1: cosine similarity between the flattened matrices of every pair of experts, [n, n]."""
    return cosine_from_gram(gram_matrix(mats))


# ---- S2: PCA of flattened expert matrices (App A.1, Fig 6) --------------------------------------

def flattened_grams(mats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(X Xᵀ, Z Zᵀ) for the flattened matrices X [n, D] and their standardised version Z, one pass.

    Z is X standardised per feature (element position) across the n experts. That needs only the
    position's n values, so each streamed block is standardised in place right after its plain Gram
    contribution: S1 and S2 together read the matrices once.
    """
    n = len(mats)
    gram = torch.zeros(n, n, dtype=torch.float64, device=mats[0].device)
    std_gram = torch.zeros(n, n, dtype=torch.float64, device=mats[0].device)
    for block in _row_blocks(mats):
        flat = _stacked_float(block)
        gram += (flat @ flat.T).double()
        flat -= flat.mean(dim=0, keepdim=True)
        std = ((flat * flat).sum(dim=0, keepdim=True) / n).sqrt()  # 25x faster than vector_norm(dim=0) on CPU
        flat /= torch.where(std > 0, std, torch.ones_like(std))
        std_gram += (flat @ flat.T).double()
    return gram, std_gram


def standardized_gram(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Z Zᵀ where Z [n, D] is the flattened matrices standardised per feature across the n experts."""
    return flattened_grams(mats)[1]


def pca_from_gram(gram: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA scores [n, c] and explained-variance ratios [c] of centred data given its Gram Z Zᵀ."""
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    c = min(n_components, gram.shape[0])
    scores = _fix_signs(evecs[:, :c] * evals[:c].sqrt())
    total = evals.sum()
    ratio = evals[:c] / total if total > 0 else torch.full((c,), float("nan"), dtype=evals.dtype, device=evals.device)
    if c < n_components:  # fewer points than components: pad with NaN
        pad = n_components - c
        nan = dict(fill_value=float("nan"), dtype=scores.dtype, device=scores.device)
        scores = torch.cat([scores, torch.full((scores.shape[0], pad), **nan)], 1)
        ratio = torch.cat([ratio, torch.full((pad,), **nan)])
    return scores, ratio


def matrix_pca(mats: Sequence[torch.Tensor], n_components: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """S2: PCA of the standardised flattened matrices; (scores [n, c], explained ratio [c])."""
    return pca_from_gram(standardized_gram(mats), n_components)


def dbscan_outliers(scores: np.ndarray, eps: float, min_samples: int = 5) -> np.ndarray:
    """S2 option: experts that DBSCAN (the paper: eps = 50) marks as noise in PCA space, as a bool mask."""
    from sklearn.cluster import DBSCAN

    labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(np.asarray(scores, dtype=np.float64))
    return labels == -1


# ---- S3: neuron-level averaging (App B, Fig 8) ---------------------------------------------------

def neuron_vectors(matrix: torch.Tensor, name: str) -> torch.Tensor:
    """The neurons of one expert matrix as rows [d_mid, d_hid]: rows of up/gate, columns of down."""
    return matrix.T if name == "down" else matrix


def neuron_average(matrix: torch.Tensor, name: str) -> torch.Tensor:
    """S3: mean over an expert's neurons -> one d_hid vector (float64; float32 sums per block of
    neurons, accumulated in float64 across blocks, with no float64 copy of the matrix)."""
    neurons = neuron_vectors(matrix, name)
    total = torch.zeros(neurons.shape[1], dtype=torch.float64, device=matrix.device)
    for block in _neuron_blocks([neurons]):
        total += block.sum(dim=0).double()
    return total / neurons.shape[0]


# ---- S5: PCA of neurons (App A.2, Fig 7) ---------------------------------------------------------

def _neuron_blocks(points: Sequence[torch.Tensor], offsets: bool = False):
    """Blocks of neurons (rows) of each expert in turn, as float32 (converted from the held dtype);
    with `offsets`, (first row, block) pairs."""
    for p in points:
        # neuron blocks: best at ~1 MiB on the CPU
        step = max(1, chunk_elements(p.device) // 4 // max(1, p.shape[1]))
        for r0 in range(0, p.shape[0], step):
            yield (r0, p[r0:r0 + step].float()) if offsets else p[r0:r0 + step].float()


def _project(points: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """points @ weight - offset in float64, block by block into one preallocated result (a list of
    small per-block results to concatenate fragmented the CPU heap by ~50 KiB per block, measured)."""
    out = torch.empty((points.shape[0], weight.shape[1]), dtype=torch.float64, device=points.device)
    for r0, block in _neuron_blocks([points], offsets=True):
        out[r0:r0 + block.shape[0]] = block @ weight
    return out.sub_(offset)


def _neuron_moments(points: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean [d], population std [d] and covariance [d, d] of the neuron points, one streamed pass."""
    d, device = points[0].shape[1], points[0].device
    total = torch.zeros(d, dtype=torch.float64, device=device)
    second = torch.zeros(d, d, dtype=torch.float64, device=device)
    n = 0
    for block in _neuron_blocks(points):
        total += block.sum(0).double()
        second += (block.T @ block).double()
        n += block.shape[0]
    mean = total / n
    cov = second / n - torch.outer(mean, mean)
    return mean, torch.diagonal(cov).clamp_min(0).sqrt(), cov


def _randomized_pca(points: Sequence[torch.Tensor], k: int, width: int = 16, power_iters: int = 2,
                    seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, int]:
    """Randomised PCA of the standardised neuron matrix Z = (X - μ) / σ (Halko et al. subspace
    iteration), streamed over X and never forming Z. Returns each expert's scores [n_e, k] (loadings
    not yet sign-fixed), the loadings [d, k], the eigenvalues of Zᵀ Z [k] and the number of features
    with variance (the trace of the correlation matrix).

    Passes over X: the first computes X's moments and Xᵀ X Ω together (Zᵀ Z (σ Ω) follows from them,
    so the moments cost no pass of their own); `power_iters` more apply Zᵀ Z; the last computes
    W = Z Q per expert, from which both the Rayleigh-Ritz eigenproblem (Qᵀ Zᵀ Z Q = Wᵀ W) and the
    scores (Z Q V = W V) follow, so no pass is spent on Qᵀ Zᵀ Z Q or on projecting the neurons.
    """
    d, device = points[0].shape[1], points[0].device
    width = min(d, max(width, k))
    # drawn on the CPU whatever the device, so every device starts from the same subspace
    omega = torch.randn(d, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    total = torch.zeros(d, dtype=torch.float64, device=device)
    squares = torch.zeros(d, dtype=torch.float64, device=device)
    product = torch.zeros(d, width, dtype=torch.float64, device=device)
    omega32 = omega.float()
    n = 0
    for block in _neuron_blocks(points):
        total += block.sum(0).double()
        squares += (block * block).sum(0).double()
        product += (block.T @ (block @ omega32)).double()
        n += block.shape[0]
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(0).sqrt()
    live = std > 0
    std = torch.where(live, std, torch.ones_like(std))  # zero-variance features standardise to 0

    def zt_z_times_scaled(xt_x_m: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Zᵀ Z (σ m) given Xᵀ X m."""
        return (xt_x_m - n * torch.outer(mean, mean @ m)) / std[:, None]

    q, _ = torch.linalg.qr(zt_z_times_scaled(product, omega))  # start: Zᵀ Z σΩ
    for _ in range(power_iters):
        m = q / std[:, None]
        m32, product = m.float(), torch.zeros(d, width, dtype=torch.float64, device=device)
        for block in _neuron_blocks(points):
            product += (block.T @ (block @ m32)).double()
        q, _ = torch.linalg.qr(zt_z_times_scaled(product, m))
    m = q / std[:, None]
    m32, offset = m.float(), mean @ m
    projected = [_project(p, m32, offset) for p in points]  # W = Z Q, expert by expert
    small = sum(w.T @ w for w in projected)  # Qᵀ Zᵀ Z Q
    evals, evecs = torch.linalg.eigh((small + small.T) / 2)
    order = evals.argsort(descending=True)[:k]
    evecs = evecs[:, order]
    return [w @ evecs for w in projected], q @ evecs, evals[order], int(live.sum())


def neuron_pca(points: Sequence[torch.Tensor], n_components: int = 3, method: str = "covariance",
               seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """S5: PCA of every neuron of every expert as one point, standardised per d_hid feature.

    `points[i]` is expert i's neurons as rows [d_mid_i, d_hid] (see `neuron_vectors`). Returns each
    expert's scores [d_mid_i, c] and the explained-variance ratios [c]. `method="covariance"` is
    exact (d_hid x d_hid correlation matrix, one pass); `"randomized"` is a randomised subspace
    iteration (four narrow passes; cheaper when d_hid is large; converges to the same components).
    """
    if method not in ("covariance", "randomized"):
        raise ValueError(f"unknown neuron PCA method {method!r}")
    if method == "randomized":
        scores, loadings, evals, live = _randomized_pca(points, n_components, seed=seed)
        signs = _column_signs(loadings)
        return [s * signs for s in scores], evals / sum(p.shape[0] for p in points) / live
    mean, std, cov = _neuron_moments(points)
    live = std > 0
    std = torch.where(live, std, torch.ones_like(std))  # zero-variance features standardise to 0
    total_var = float(live.sum())  # trace of the correlation matrix
    evals, evecs = torch.linalg.eigh(cov / torch.outer(std, std))
    evals, evecs = evals.flip(0)[:n_components], evecs.flip(1)[:, :n_components]
    loadings = _fix_signs(evecs)
    weight = (loadings / std[:, None]).float()
    offset = (mean / std) @ loadings
    scores = [_project(p, weight, offset) for p in points]
    return scores, evals / total_var


# ---- memory --------------------------------------------------------------------------------------

def working_set_bytes(neurons: int, d_hid: int, covariance: bool, device: torch.device) -> int:
    """Bytes the analyses of one matrix kind allocate beside the matrices (`neurons` rows of `d_hid`
    over all of them) on `device`: a stacked float32 block and its temporaries (S1/S2), a converted
    neuron block (S3, S5), S5's float64 projections and scores per neuron, and the d_hid x d_hid
    moments of the exact S5 path (the randomised one keeps d_hid x 16 blocks)."""
    block = chunk_elements(device) * 4 * 3
    per_neuron = neurons * (16 + 2 * 3) * 8
    moments = 3 * d_hid * d_hid * 8 if covariance else d_hid * 16 * 8 * 4
    return block + per_neuron + moments


# ---- S6: gate embedding vs expert W_gate (§4.2, App C, Tab 3, Tab 4) ----------------------------

def gate_embedding_similarity(router_weight: torch.Tensor) -> torch.Tensor:
    """S6 X: cosine similarity between the router's rows (one embedding per expert), [E, E]."""
    return cosine_matrix(router_weight)


def upper_triangle_pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson R between the i<j entries of two square similarity matrices (NaN if undefined)."""
    iu = torch.triu_indices(x.shape[0], x.shape[1], offset=1, device=x.device)
    a, b = x[iu[0], iu[1]].double(), y[iu[0], iu[1]].double()
    if a.numel() < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denom = torch.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")
