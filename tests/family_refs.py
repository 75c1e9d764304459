"""Independent references the new-family tests share: float64 static quantities written from their
definitions (design §4), and transformers' own models filled from a checkpoint's raw tensors with
transformers' own dequantisation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from moe_ray.store import expert_codes


def raw_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def cosine64(mats: list[np.ndarray]) -> np.ndarray:
    """S1 in float64: cosine between flattened matrices."""
    flat = np.stack([m.astype(np.float64).ravel() for m in mats])
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    return unit @ unit.T


def neuron_average64(m: np.ndarray, matrix: str) -> np.ndarray:
    """S3's mean neuron: rows of W_up/W_gate, columns of W_down."""
    return m.astype(np.float64).mean(axis=1 if matrix == "down" else 0)


def pearson64(x: np.ndarray, y: np.ndarray) -> float:
    iu = np.triu_indices(x.shape[0], 1)
    return float(np.corrcoef(x[iu], y[iu])[0, 1])


def check_static_against_float64(ds, layer: int, experts: dict[str, dict[str, np.ndarray]], router: np.ndarray,
                                 shared: dict[str, np.ndarray] | None = None) -> None:
    """The store's S1, S3 and S6 for `layer` equal float64 references from independently read weights."""
    labels = list(expert_codes(list(experts) + (["SE"] if shared is not None else [])))  # the stored codes
    n = len(experts)
    gate_x = cosine64([r for r in router])
    np.testing.assert_allclose(ds.gate_embedding_similarity.sel(layer=layer, expert_i=labels[:n],
                                                                expert_j=labels[:n]).values, gate_x, atol=2e-6)
    for matrix in ("up", "gate", "down"):
        mats = [experts[e][matrix] for e in experts] + ([shared[matrix]] if shared is not None else [])
        sel = dict(layer=layer, matrix=matrix, expert_i=labels, expert_j=labels)
        np.testing.assert_allclose(ds.matrix_similarity.sel(**sel).values, cosine64(mats), atol=2e-6)
        avg = cosine64([neuron_average64(m, matrix) for m in mats])
        np.testing.assert_allclose(ds.neuron_avg_similarity.sel(**sel).values, avg, atol=2e-6)
        r = pearson64(gate_x, avg[:n, :n])
        assert abs(float(ds.gate_weight_correlation.sel(layer=layer, matrix=matrix)) - r) < 1e-5


def hf_model_from_state(config_cls, model_cls, config: dict, state: dict[str, torch.Tensor], attn: str = "sdpa"):
    """transformers' own model in float32 with `state` loaded strictly (every parameter and buffer)."""
    hf_config = config_cls(**config)
    hf_config._attn_implementation = attn
    model = model_cls(hf_config).float()
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def check_planted_permutations(ds, layer: int, planted: dict, experts: tuple[str, ...]) -> None:
    """`reorder/joint` recovered make-tiny's planted permutations exactly: W_e[r] = W_src[pi[r]], so
    neuron k of the source is neuron argsort(pi)[k] of e, and the reordered matrices coincide."""
    for e in experts:
        src, pi = str(planted[e]["source"]), np.array(planted[e]["perm"])
        pair = ds.sel(layer=layer, expert_i=int(src), expert_j=int(e))
        np.testing.assert_array_equal(pair.permutation.values, np.argsort(pi))
        np.testing.assert_allclose(pair.similarity_after.values, 1.0, atol=1e-5)
