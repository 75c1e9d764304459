"""The results store: one Zarr v3 store per job, the one contract between compute and plotting.

Layout (design §5): `static/<quantity>`, `reorder/<mode>/<quantity>`, `dynamic/<input>/<quantity>`,
`causal/<check>/<quantity>` (the causal checks, beyond the paper).
Every array carries `dimension_names`; every dimension has a coordinate array of the same name
(labels as variable-length UTF-8 strings), so `xarray.open_zarr(store, group="static")` gives named
dimensions with no moe-ray code. Chunks follow work units (a layer, a layer x pair), so concurrent
workers never write the same chunk. A unit writes its data, then sets its flag in the group's
`unit_done` array; a resumed job skips units whose flag is set. Where a job plans only some of a
group's cells (reorder with chosen pairs), the driver records which in `unit_planned`, so progress
counts the units the job runs.

A store knows the weights it was made from: the root's `identity` holds the model's and the
reference's fingerprints (`Checkpoint.fingerprint`: config.json, and per decoder layer the tensors'
layout and sampled content). A job over other weights is refused, naming the first tensor that
differs, before anything is written (`ResultStore.check_identity`). A job whose units are all done
writes nothing (`ResultStore.dry_run` finds that out without writing), so a read-only complete store
works; otherwise each run is logged in the root's `runs`, and a run that fails leaves
`state = "failed"` and its error at the root.

The schema below is the single list of what each analysis group holds; writers and the plotting
code both read it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
import zarr.storage

from . import __version__
from . import fs as storage
from .errors import StoreError

if TYPE_CHECKING:
    import xarray as xr

SCHEMA_VERSION = 1
DONE = "unit_done"
PLANNED = "unit_planned"


@dataclass(frozen=True)
class Quantity:
    """One stored array: its dimensions, dtype and what it means."""

    dims: tuple[str, ...]
    description: str
    dtype: str = "float32"
    fill: float | int | None = None
    """Value of unwritten elements (default: NaN for floats, 0 for integers)."""


STATIC_SCHEMA: dict[str, Quantity] = {
    "matrix_similarity": Quantity(
        ("layer", "matrix", "expert_i", "expert_j"),
        "S1 (paper §4.1.1, Fig 1): cosine similarity between the flattened weight matrices of two experts"),
    "matrix_pca": Quantity(
        ("layer", "matrix", "expert", "component"),
        "S2 (App A.1, Fig 6): PCA scores of each expert's flattened matrix, standardised per element "
        "across experts"),
    "matrix_pca_explained": Quantity(
        ("layer", "matrix", "component"), "S2: fraction of variance explained by each matrix-PCA component"),
    "matrix_pca_outlier": Quantity(
        ("layer", "matrix", "expert"),
        "S2 option: 1 where DBSCAN marks the expert as an outlier in matrix-PCA space (paper: eps 50)",
        "uint8"),
    "neuron_avg_similarity": Quantity(
        ("layer", "matrix", "expert_i", "expert_j"),
        "S3 (App B, Fig 8): cosine similarity between experts' mean neuron vectors"),
    "neuron_pca": Quantity(
        ("layer", "matrix", "expert", "neuron", "component"),
        "S5 (App A.2, Fig 7): PCA scores of every neuron (up/gate row, down column), standardised per "
        "hidden feature across all neurons of the layer's experts; NaN past an expert's own d_mid"),
    "neuron_pca_explained": Quantity(
        ("layer", "matrix", "component"), "S5: fraction of variance explained by each neuron-PCA component"),
    "gate_embedding_similarity": Quantity(
        ("layer", "expert_i", "expert_j"),
        "S6 X (§4.2, Fig 8): cosine similarity between router (gate embedding) rows; NaN for F and SE"),
    "gate_weight_correlation": Quantity(
        ("layer", "matrix"),
        "S6 (Tab 4): Pearson R between the i<j entries of gate_embedding_similarity and of "
        "neuron_avg_similarity among routed experts"),
}
STATIC_SUMMARY: dict[str, Quantity] = {
    "gate_weight_r2_mean": Quantity(
        ("matrix",), "S6 (Tab 3): the square of gate_weight_correlation averaged over layers"),
}

REORDER_SCHEMA: dict[str, Quantity] = {
    "similarity_before": Quantity(
        ("layer", "matrix", "expert_i", "expert_j"),
        "S4 (§4.1.2, Tab 2): cosine between the flattened matrices of experts i and j as stored; "
        "filled for i < j (separate mode: each matrix from its own unit; joint: all three)"),
    "similarity_after": Quantity(
        ("layer", "matrix", "expert_i", "expert_j"),
        "S4: cosine between expert i's flattened matrix and expert j's with its neurons reordered by "
        "the optimal permutation (permutation[..., k] is the neuron of j placed at k); i < j"),
    "growth": Quantity(
        ("layer", "matrix", "expert_i", "expert_j"),
        "S4 (Tab 2 'order of growth'): the relative growth (similarity_after - similarity_before) / "
        "|similarity_before|; Tab 2 is its median over layers and pairs with its order of magnitude "
        "10^round(log10|median|); i < j"),
    "optimality_gap": Quantity(
        ("layer", "matrix", "expert_i", "expert_j"),
        "S4: upper bound on how far the assignment's total similarity (sum of the matrices' neuron "
        "cosines it was solved on) is below the optimum, from lapjv's dual certificate; i < j"),
    "kendall_tau": Quantity(
        ("layer", "expert_i", "expert_j"),
        "S4 (Tab 2 tau): Kendall's tau between the identity order and the permutation; i < j "
        "(separate mode adds a matrix dimension)"),
    "permutation": Quantity(
        ("layer", "expert_i", "expert_j", "neuron"),
        "S4: permutation[..., k] = the neuron of expert_j matched to neuron k of expert_i, so "
        "W_j[permutation] lines up with W_i (rows of up/gate, columns of down); -1 where not computed "
        "(separate mode adds a matrix dimension)", "int32", -1),
}
"""Arrays of `reorder/<mode>`; in separate mode `kendall_tau` and `permutation` gain a `matrix`
dimension after `layer` (see `reorder_quantity`)."""


def reorder_quantity(name: str, mode: str) -> Quantity:
    """The REORDER_SCHEMA entry for `name` with the dims of `mode` (joint or separate)."""
    q = REORDER_SCHEMA[name]
    if mode == "separate" and "matrix" not in q.dims:
        q = Quantity(("layer", "matrix") + q.dims[1:], q.description, q.dtype, q.fill)
    return q


DYNAMIC_SCHEMA: dict[str, Quantity] = {
    "tokens": Quantity(("token",), "the input's tokens as the tokenizer spells them", "str"),
    "token_ids": Quantity(("token",), "the input's token ids (BOS first where the tokenizer has one)", "int64"),
    "router_logits": Quantity(
        ("layer", "token", "expert"), "D3/D5: the router's logits (pre-softmax) at the MoE block's input; "
        "NaN for F and SE"),
    "gate_scores": Quantity(
        ("layer", "token", "expert"), "D3 (§5.2, Fig 4): router scores, softmax over all experts; NaN for F and SE"),
    "topk_experts": Quantity(("layer", "token", "k"), "D5 (App E, Fig 10): the experts the family's own rule picks",
                             "int64"),
    "topk_weights": Quantity(("layer", "token", "k"), "D5: the family's own top-k weights of those experts"),
    "expert_output_norms": Quantity(
        ("layer", "token", "expert"), "D3 (§5.2, Fig 4): L2 norm of every expert's output (Topk = ALL), F and SE"),
    "expert_output_similarity": Quantity(
        ("layer", "token", "expert_i", "expert_j"),
        "D1 (§5.1, Fig 2): per token, cosine between the outputs of two experts (and F, SE)"),
    "expert_output_angular_mean": Quantity(
        ("layer", "expert_i", "expert_j"),
        "D2 (§5.1, Fig 3): 1 - arccos(cosine)/π of two experts' outputs, averaged over the input's tokens"),
    "norm_score_rank_counts": Quantity(
        ("layer", "norm_rank", "score_rank"),
        "D3 (App D, Fig 9): (token, routed expert) pairs whose output norm has rank norm_rank and "
        "router score rank score_rank (0 = largest)", "int64"),
    "activation_ratio": Quantity(
        ("layer", "token", "expert"),
        "D4 (§5.3, Fig 5): fraction of act(W_gate x) elements with |value| > 1e-3"),
    "intermediate_states": Quantity(
        ("layer", "probe_token", "expert", "neuron"),
        "D4 (§5.3, Fig 5): act(W_gate x) of the first tokens; NaN past a label's own d_mid"),
    "expert_outputs": Quantity(
        ("layer", "token", "expert", "hidden"),
        "optional (save_expert_outputs): every expert's raw output vector (Topk = ALL), F and SE"),
}


LOSS_UNIT = "nats"
CAUSAL_SCHEMA: dict[str, dict[str, Quantity]] = {
    "causal": {
        "sequence_tokens": Quantity(
            ("sequence",), "tokens of each corpus sequence whose next token is predicted (its length - 1)", "int64"),
        "loss": Quantity(
            ("sequence",), "the unmodified model's next-token loss, -log p(token t+1 | tokens <= t) summed over "
            "the sequence's predicted tokens (nats); the corpus loss is sum(loss) / sum(sequence_tokens)", "float64"),
    },
    "causal/norm_routing": {
        "topk_overlap": Quantity(
            ("layer", "sequence"), "§5.2 claim: sum over the sequence's tokens of |gate top-k ∩ top-k by expert "
            "output norm| (Topk = ALL outputs of the routed experts)", "int64", -1),
        "topk_match": Quantity(
            ("layer", "sequence"), "tokens of the sequence whose gate top-k and norm top-k are the same set",
            "int64", -1),
        "agreement": Quantity(
            ("layer",), "mean over the corpus's tokens of |gate top-k ∩ norm top-k| / k (1: the gate always picks "
            "the experts with the largest output norms)"),
        "match_rate": Quantity(
            ("layer",), "fraction of the corpus's tokens whose gate top-k is exactly the norm top-k"),
        "loss": Quantity(
            ("layer", "sequence"), "next-token loss summed over the sequence (nats) when this layer routes by "
            "expert output norm (its top-k by norm, weighted as the family weighs a choice) and every other "
            "layer as the model does", "float64"),
        "delta_loss": Quantity(
            ("layer", "stat"), "change of the corpus's loss per token (nats) from routing this layer by norm: "
            "the estimate and its bootstrap interval over sequences"),
    },
    "causal/norm_routing_all": {
        "loss": Quantity(
            ("sequence",), "next-token loss summed over the sequence (nats) when every analysed MoE layer "
            "routes by expert output norm (norms taken on the hidden states this routing produces)", "float64"),
        "delta_loss": Quantity(
            ("stat",), "change of the corpus's loss per token (nats) from routing every analysed MoE layer by "
            "norm: the estimate and its bootstrap interval over sequences"),
    },
    "causal/ablation": {
        "loss": Quantity(
            ("layer", "expert", "sequence"), "next-token loss summed over the sequence (nats) with this expert "
            "removed from this layer's routing (the family's rule over the remaining experts; SE: the shared "
            "expert's output left out)", "float64"),
        "delta_loss": Quantity(
            ("layer", "expert", "stat"), "change of the corpus's loss per token (nats) from removing this "
            "expert: the estimate and its bootstrap interval over sequences"),
    },
    "causal/agreement": {
        "tokens": Quantity(
            ("layer", "sequence"), "tokens of the sequence summed into output_similarity_sum", "int64"),
        "output_similarity_sum": Quantity(
            ("layer", "sequence", "output", "expert_i", "expert_j"), "sum over the sequence's tokens of D1's "
            "cosine (output 'cosine') and D2's angular similarity 1 - arccos(cos)/π ('angular') between two "
            "routed experts' outputs (Topk = ALL)"),
        "output_similarity": Quantity(
            ("layer", "output", "expert_i", "expert_j"), "§6 'Correlation measurement': the corpus mean (over "
            "all its tokens) of D1's cosine and D2's angular similarity between two routed experts' outputs"),
        "weight_similarity": Quantity(
            ("layer", "matrix", "expert_i", "expert_j"), "S1 (§4.1.1): cosine between the flattened matrices "
            "of two routed experts, as static/matrix_similarity"),
        "correlation": Quantity(
            ("layer", "matrix", "output"), "Pearson R between the i<j entries of weight_similarity (S1) and of "
            "output_similarity (D1 cosine or D2 angular, over the corpus)"),
    },
}
"""Arrays of the causal checks (beyond the paper), by group: the corpus and the unmodified model's loss
in `causal`, then one group per check."""


_MISSING = object()


def _short(values: np.ndarray, limit: int = 8) -> str:
    items = [str(v) for v in np.asarray(values).ravel()[:limit].tolist()]
    return "[" + ", ".join(items) + (", ..." if np.asarray(values).size > limit else "") + "]"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _zarr_store(url: str, mode: str):
    """The zarr store at `url`: a local directory, or any fsspec URL opened with this process's
    storage options (`moe_ray.fs`)."""
    if not storage.is_local(url):
        return zarr.storage.FsspecStore.from_url(url, storage_options=storage.options_for(url),
                                                 read_only=mode == "r")
    return zarr.storage.LocalStore(storage.local_path(url), read_only=mode == "r")


def _exists(url: str) -> bool:
    """Whether anything is at `url`. A location that cannot be looked at (no credentials, no bucket, a
    path under a regular file, a symlink loop) is a StoreError naming it, never "not there"."""
    fs, path = storage.filesystem(url)
    try:
        if storage.is_local(url):
            os.stat(path)  # ELOOP, ENOTDIR, EACCES are errors here; os.path.exists says False
            return True
        return fs.exists(path)
    except FileNotFoundError as exc:
        if storage.is_local(url):
            return False
        raise StoreError(f"cannot look at the store {url}: {storage.describe_error(exc, url)}") from None
    except Exception as exc:
        why = storage.describe_error(exc, url)
        if why is None:
            raise
        raise StoreError(f"cannot look at the store {url}: {why}") from None


ROOT_DOCUMENT = "zarr.json"


def _root_document(url: str) -> bytes | None:
    """The raw bytes of the store's root metadata document, or None if there is none."""
    fs, path = storage.filesystem(url)
    doc = f"{path.rstrip('/')}/{ROOT_DOCUMENT}"
    try:
        return storage.read_file(fs, doc) if fs.isfile(doc) else None
    except FileNotFoundError:
        return None


def _is_moe_ray_store(url: str) -> bool:
    try:
        root = zarr.open_group(_zarr_store(url, "r"), mode="r", use_consolidated=False)
    except Exception:
        return False
    return "moe_ray" in root.attrs


def damaged_root(url: str) -> str | None:
    """Why the store at `url` is a moe-ray store whose root metadata cannot be read (its zarr.json
    unreadable, but naming moe_ray or sitting above moe-ray's analysis groups), or None: it reads, or
    it is not a moe-ray store, or nothing is there."""
    try:
        raw = _root_document(url)
        if raw is None:
            return None
        zarr.open_group(_zarr_store(url, "r"), mode="r", use_consolidated=False)
        return None
    except Exception as exc:
        error = exc
    fs, path = storage.filesystem(url)
    groups = ("static", "reorder", "dynamic", "causal")
    ours = b'"moe_ray"' in (raw or b"") or any(fs.isfile(f"{path.rstrip('/')}/{g}/{ROOT_DOCUMENT}") for g in groups)
    return f"its root metadata {ROOT_DOCUMENT} cannot be read ({_first_line(error)})" if ours else None


def _identity_difference(stored: dict, identity: dict, unit_keys: dict[str, dict[str, list[str]]]) -> str | None:
    """Why the weights a store was made from differ from `identity` (None: the same weights), naming
    the model or the reference and the first tensor that differs."""
    for role in ("model", "reference"):
        old, new = stored.get(role), identity.get(role)
        why = _weights_difference(old, new, role, unit_keys.get(role, {}))
        if why:
            return why
    return None


def _weights_difference(old: dict | None, new: dict | None, role: str, keys: dict[str, list[str]]) -> str | None:
    if old is None and new is None:
        return None
    if old is None:
        return f"the store was made without a {role}, this job has one ({new.get('location')})"
    if new is None:
        return f"the store was made with a {role} ({old.get('location')}), this job has none"
    if old.get("fingerprint") != new.get("fingerprint") or "units" not in old:
        return (f"the store's {role} was fingerprinted by another moe-ray version, so its weights cannot be "
                "compared")
    if old["config"] != new["config"]:
        fields = sorted(set(old["config"]) | set(new["config"]))
        name = next(k for k in fields if old["config"].get(k) != new["config"].get(k))
        return (f"the {role}'s config.json differs ({name}: {old['config'].get(name)!r} in the store, "
                f"{new['config'].get(name)!r} now)")
    for unit in dict.fromkeys([*old["units"], *new["units"]]):
        a, b = old["units"].get(unit), new["units"].get(unit)
        if a == b:
            continue
        if a is None or b is None or a["layout"] != b["layout"]:
            return f"the {role}'s tensors of {unit} differ in names, dtypes or shapes"
        i = next(i for i in range(0, len(a["tensors"]), 8) if a["tensors"][i:i + 8] != b["tensors"][i:i + 8]) // 8
        names = keys.get(unit) or []
        name = names[i] if i < len(names) else f"number {i}"
        return f"the {role}'s tensor {name} ({unit}) differs from the one the store was made from"
    return None


class ResultStore:
    """A moe-ray store opened for writing (by the driver or a worker) or for reading.

    `ResultStore.dry_run(url)` opens an existing store read-only for a rehearsal of a job's
    `prepare`: groups the store lacks (or would replace) are made in memory instead, anything else
    that would have to be written sets `needs_write`, and every refusal (other parameters, other
    coordinates) is raised as it would be for real, so it comes before any write.
    """

    def __init__(self, url: str, mode: str = "r+"):
        self.url = str(url)
        try:
            self.root = zarr.open_group(_zarr_store(self.url, mode), mode=mode, use_consolidated=False)
        except Exception as exc:
            raise StoreError(f"cannot open store {self.url}: {exc}") from None
        if "moe_ray" not in self.root.attrs:
            raise StoreError(f"{self.url} is not a moe-ray store")
        self.needs_write = False
        self._scratch: zarr.Group | None = None

    @classmethod
    def dry_run(cls, url: str) -> "ResultStore":
        store = cls(url, mode="r")
        store._scratch = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
        return store

    # ---- creating -----------------------------------------------------------------------------
    @classmethod
    def existing(cls, url: str, overwrite: bool = False) -> "ResultStore | None":
        """The moe-ray store at `url`, opened read-only, or None if nothing is there (or, with
        `overwrite`, a moe-ray store whose root metadata is damaged: the caller replaces it); a path
        that holds anything else is refused (moe-ray never touches what it did not make)."""
        url = str(url)
        if not _exists(url):
            return None
        if not _is_moe_ray_store(url):
            damage = damaged_root(url)
            if damage and overwrite:
                return None
            if damage:
                raise StoreError(f"store {url} is damaged: {damage}; pass --overwrite to replace it, or choose "
                                 "another --store")
            raise StoreError(f"{url} exists and is not a moe-ray store; choose another --store path "
                             "(moe-ray never deletes what it did not create)")
        return cls(url, mode="r")

    def check_identity(self, identity: dict, unit_keys: dict[str, dict[str, list[str]]] | None = None,
                       overwrite: bool = False) -> bool:
        """True if this store was made from the same weights as `identity`; False if not and
        `overwrite` (the caller replaces it); else a StoreError naming what differs."""
        why = _identity_difference(dict(self.root.attrs.get("identity") or {}), _jsonable(identity), unit_keys or {})
        if why is None:
            return True
        if overwrite:
            return False
        raise StoreError(f"{self.url} holds results for other weights: {why}; pass --overwrite to replace "
                         "the store, or choose another --store")

    @classmethod
    def create_or_reuse(cls, url: str, identity: dict, spec: dict, overwrite: bool = False,
                        unit_keys: dict[str, dict[str, list[str]]] | None = None,
                        attrs: dict | None = None) -> "ResultStore":
        """Create a store, or reuse one made from the same weights (the model's and the reference's),
        logging this run in its `runs`.

        A path that exists and is not a moe-ray store is never touched. A moe-ray store made from
        other weights is refused unless `overwrite`, which deletes it first (`overwrite` always
        starts afresh). `attrs` are set on a new store's root (model facts, ...).
        """
        url = str(url)
        existing = cls.existing(url, overwrite)
        if existing is None and overwrite and _exists(url):
            cls._delete(url)  # a moe-ray store whose root metadata cannot be read: replaced
        if existing is not None:
            if existing.check_identity(identity, unit_keys, overwrite) and not overwrite:
                store = cls(url)
                store.start_run(spec)
                return store
            existing.delete()
        root = zarr.open_group(_zarr_store(url, "w"), mode="w")
        root.attrs.update({
            "moe_ray": {"schema_version": SCHEMA_VERSION, "version": __version__},
            "identity": _jsonable(identity),
            "spec": _jsonable(spec),
            "created": _now(),
            **_jsonable(attrs or {}),
        })
        store = cls(url)
        store.start_run(spec)
        return store

    def start_run(self, spec: dict) -> None:
        """Log a run in the root's `runs` and mark the store as running."""
        runs = list(self.root.attrs.get("runs", []))
        self.root.attrs.update({"runs": runs + [{"spec": _jsonable(spec), "started": _now()}],
                                "state": "running", "error": None})

    def end_run(self, error: str | None = None) -> None:
        """Close the last run's log entry: `state` complete, or failed with its one-line `error`."""
        runs = list(self.root.attrs.get("runs", [])) or [{}]
        state = "failed" if error else "complete"
        runs[-1] = {**runs[-1], "ended": _now(), "state": state, **({"error": error} if error else {})}
        self.root.attrs.update({"runs": runs, "state": state, "error": error})

    def delete(self) -> None:
        self._delete(self.url)

    @staticmethod
    def _delete(url: str) -> None:
        fs, path = storage.filesystem(url)
        fs.rm(path, recursive=True)

    def group(self, path: str, params: dict | None = None, overwrite: bool = False) -> zarr.Group:
        """An analysis group; reusing one computed with other parameters is refused."""
        params = _jsonable(params or {})
        if path in self.root:
            group = self.root[path]
            if group.attrs.get("params", {}) != params:
                if not overwrite:
                    old = group.attrs.get("params", {})
                    name = next(k for k in sorted(set(old) | set(params)) if old.get(k) != params.get(k))
                    raise StoreError(
                        f"{self.url}/{path} was computed with other parameters ({name}: {old.get(name)!r} in "
                        f"the store, {params.get(name)!r} now); pass --overwrite or choose another --store")
                if self._scratch is None:
                    del self.root[path]
            else:
                return group
        if self._scratch is not None:  # a rehearsal: build the group in memory
            self.needs_write = True
            group = self._scratch.require_group(path)
        else:
            group = self.root.require_group(path)
        group.attrs["params"] = params
        return group

    @staticmethod
    def set_attrs(group: zarr.Group, **values: Any) -> None:
        """Set a group's attributes, writing only those that change (a rerun of a complete job
        writes nothing)."""
        values = _jsonable(values)
        changed = {k: v for k, v in values.items() if group.attrs.get(k, _MISSING) != v}
        if changed:
            group.attrs.update(changed)

    @staticmethod
    def coord(group: zarr.Group, name: str, values) -> None:
        """A 1-D coordinate array named after its dimension (strings as variable-length UTF-8)."""
        values = np.asarray(values)
        if name in group:
            old = group[name][...]
            if old.shape != values.shape or not np.array_equal(np.asarray(old, dtype=values.dtype), values):
                raise StoreError(f"coordinate {group.path}/{name} in the store is {_short(old)}, this job's is "
                                 f"{_short(values)}; choose another --store, or --overwrite to replace it")
            return
        dtype = str if values.dtype.kind in "UOT" else values.dtype
        arr = group.create_array(name, shape=values.shape, dtype=dtype, dimension_names=[name])
        arr[...] = values

    @staticmethod
    def array(group: zarr.Group, name: str, quantity: Quantity, unit_dims: tuple[str, ...],
              attrs: dict | None = None, chunks: dict[str, int] | None = None) -> zarr.Array:
        """The array for `quantity`, sized from the group's coordinates, chunked 1 along unit dims
        (or as `chunks` says for some of them: tiles of units that one task writes together)."""
        shape = tuple(group[d].shape[0] for d in quantity.dims)
        if name in group:
            arr = group[name]
            if tuple(arr.shape) != shape:
                raise StoreError(f"{group.path}/{name} has shape {arr.shape} in the store, this job needs {shape}")
            return arr
        tile = chunks or {}
        chunks = tuple(min(n, tile.get(d, 1)) if d in unit_dims else n for d, n in zip(quantity.dims, shape))
        fill = np.nan if quantity.dtype.startswith("float") else 0
        if quantity.fill is not None:
            fill = quantity.fill
        return group.create_array(
            name, shape=shape, chunks=chunks, dtype=quantity.dtype, fill_value=fill,
            dimension_names=list(quantity.dims),
            attributes={"description": quantity.description, **(attrs or {})})

    @staticmethod
    def done_array(group: zarr.Group, unit_dims: tuple[str, ...], planned: np.ndarray | None = None,
                   chunks: dict[str, int] | None = None) -> zarr.Array:
        """The group's `unit_done` flags; with `planned` (a bool array of its shape: the cells this
        job runs, where that is not all of them), also `unit_planned`, which progress counts."""
        done = ResultStore.array(group, DONE, Quantity(
            unit_dims, "1 where this work unit's results are complete (resume skips those)", "uint8"), unit_dims,
            chunks=chunks)
        if planned is not None:
            planned = np.asarray(planned, dtype=np.uint8)
            if PLANNED in group and tuple(group[PLANNED].shape) == planned.shape:
                if np.array_equal(group[PLANNED][...], planned):
                    return done
                group[PLANNED][...] = planned
            else:
                if PLANNED in group:
                    del group[PLANNED]
                arr = group.create_array(
                    PLANNED, shape=planned.shape, chunks=planned.shape, dtype="uint8", fill_value=0,
                    dimension_names=list(unit_dims),
                    attributes={"description": "1 where the latest job planned this unit (progress counts these)"})
                arr[...] = planned
        return done

    # ---- reading --------------------------------------------------------------------------
    def consolidate(self) -> None:
        """One metadata document for fast opening (xarray uses it); zarr 3 warns it is not in the v3
        spec yet, which we accept: plain per-array metadata stays in place for other readers."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(self.root.store)

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)


def progress(root: zarr.Group, analyses: "Iterable[str] | None" = None) -> dict[str, tuple[int, int]]:
    """Units done and units planned per analysis (`static`, `reorder`, `dynamic`: the store's
    top-level groups), from every group's `unit_done` and, where a job planned only some cells,
    `unit_planned`; only `analyses` if given."""
    out: dict[str, tuple[int, int]] = {}

    def visit(group: zarr.Group, path: str) -> None:
        members = dict(group.members())
        if DONE in members:
            done = np.asarray(members[DONE][...]) != 0
            planned = np.asarray(members[PLANNED][...]) != 0 if PLANNED in members else np.ones_like(done)
            top = path.split("/", 1)[0]
            d, t = out.get(top, (0, 0))
            out[top] = (d + int((done & planned).sum()), t + int(planned.sum()))
        for name, member in members.items():
            if isinstance(member, zarr.Group) and (path or analyses is None or name in analyses):
                visit(member, f"{path}/{name}" if path else name)

    visit(root, "")
    return out if analyses is None else {a: out[a] for a in analyses if a in out}


def store_progress(url: str, analyses: "Iterable[str] | None" = None) -> dict[str, tuple[int, int]]:
    """`progress` of the store at `url`, read live (not from consolidated metadata); empty while it
    does not exist or cannot be read yet."""
    try:
        if not _exists(url):
            return {}
        root = zarr.open_group(_zarr_store(url, "r"), mode="r", use_consolidated=False)
        return progress(root, analyses)
    except Exception:
        return {}


def progress_text(counts: dict[str, tuple[int, int]]) -> str:
    """`static 4/4, reorder 24/28 units`."""
    return ", ".join(f"{name} {d}/{t}" for name, (d, t) in counts.items()) + " units" if counts else ""


def find_damage(url: str) -> str | None:
    """Where the store at `url` cannot be read, as `static/matrix_similarity/c/0/0/0/0: <why>` (the
    first array chunk or metadata document that fails to decode), or None if every chunk reads.
    Reads the whole store: for explaining a failure, not for routine checks. Only a store that
    exists and has root metadata can be damaged: None for anything else (see `damaged_root`)."""
    try:
        if not _exists(str(url)) or _root_document(str(url)) is None:
            return None
    except Exception:
        return None  # cannot even look: not damage, the error that happened says why
    try:
        root = zarr.open_group(_zarr_store(str(url), "r"), mode="r", use_consolidated=False)
        members = list(root.members(max_depth=None))
    except Exception as exc:
        return f"its metadata cannot be read: {_first_line(exc)}"
    for path, member in members:
        if not isinstance(member, zarr.Array):
            continue
        try:
            member[...]
            continue
        except Exception as exc:
            error = exc
        for index in np.ndindex(*member.cdata_shape):
            try:
                member.get_block_selection(index)
            except Exception as exc:
                return f"{path}/{member.metadata.encode_chunk_key(index)}: {_first_line(exc)}"
        return f"{path}: {_first_line(error)}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def unit_done(group: zarr.Group) -> np.ndarray:
    """The group's done flags as a bool array over its unit dimensions."""
    return np.asarray(group[DONE][...]).astype(bool)


def open_results(url: str, storage_options: dict | None = None) -> "xr.DataTree":
    """The whole store as an `xarray.DataTree` (groups static, reorder/<mode>, dynamic/<input>); a URL
    is opened with `storage_options` (default: the filesystem's own credentials, AWS_* for s3://)."""
    import xarray as xr  # here, not at the top: workers writing the store never need it

    url = str(url)
    with storage.use_storage_options(storage_options or storage.storage_options()):
        if not _exists(url) or not _is_moe_ray_store(url):
            raise StoreError(f"{url} is not a moe-ray store")
        extra = {"storage_options": storage.options_for(url)} if not storage.is_local(url) else {}
        return xr.open_datatree(url, engine="zarr", consolidated=None, **extra)
