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
reference's config.json and tensor layout (`Checkpoint.fingerprint`), and each group's `unit_weights`
the content digests of every tensor each done unit read (`Checkpoint.digests`, written with the
unit's results, before its done flag). A job over other weights is refused before anything is
written: another config or layout (`ResultStore.check_identity`), or any changed byte of a tensor a
done unit read (`ResultStore.check_weights` recomputes the digests), naming the tensor. A store knows
what it holds: every done unit must have its chunk of every array its group's units write (the
group's `unit_arrays`); one that does not is damage (`missing_results`, `store_status`), and the next
run recomputes exactly those units (`ResultStore.done_array`, `check_units`, `repairs`). Arrays a job's
`finish` writes whole over all units (a group's `summary_arrays`) are checked once it has written them
(`summarised`; `check_summaries`), so a store mid-run is partial or running, never damaged. One writer at a time: `run`
holds the store's lease (`moe_ray.lease`). A job whose units are all done writes nothing
(`ResultStore.dry_run` finds that out without writing), so a read-only complete store works;
otherwise each run is logged in the root's `runs`, and a run that fails leaves `state = "failed"`
and its error at the root.

The schema below is the single list of what each analysis group holds; writers and the plotting
code both read it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from collections.abc import Callable, Iterable
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

    from .checkpoint import Checkpoint

SCHEMA_VERSION = 2
"""2: expert dimensions have integer coordinates (F -1, SE -2) and `<dim>_label` string coordinates;
1 had the labels as the coordinate (still read, and resumed, as such)."""
EXPERT_DIMS = ("expert", "expert_i", "expert_j")
"""Dimensions along experts: their coordinate holds integer codes, routed experts 0..E-1, the dense
reference F = -1 and the shared expert SE = -2 (`EXPERT_CODES`), and `<dim>_label` the labels."""
EXPERT_CODES = {"F": -1, "SE": -2}
EXPERT_LABEL_DOC = ("expert labels along this dimension: routed experts '0'..'E-1', 'F' (the dense reference "
                    "FFN, code -1) and 'SE' (the shared expert, code -2); the dimension's coordinate holds the codes")
BOOKKEEPING = "bookkeeping"
"""The `role` attribute of arrays that record work done (`unit_done`, `unit_planned`), not results;
`open_results` makes them coordinates, out of the data variables."""
JOB_ENV = "MOE_RAY_JOB_ID"
"""Set in a submitted job's environment to its submission id; the store's run log records it."""
DONE = "unit_done"
PLANNED = "unit_planned"
WEIGHTS = "unit_weights"
"""Per work unit, the content digests (`Checkpoint.digests`) of every tensor it read, as JSON
`{"model": {tensor: digest}, "reference": {...}}`, written with its results before its done flag."""

SUMMARY_ARRAYS = "summary_arrays"
"""Group attribute: the arrays a job's `finish` writes whole from its done units (and those its driver
writes once for the group); `missing_summaries` checks them once `SUMMARISED` is set."""
SUMMARISED = "summarised"
"""Group attribute, true once `finish` wrote the group's summaries over all its units; a job with units
to (re)compute in the group clears it first (`ResultStore.check_summaries`), so a store mid-run (its
summaries stale or not yet written) is partial or running, never damaged."""

zarr.config.set({"array.write_empty_chunks": True})
"""Every chunk a unit writes is stored, even one that equals the fill value (zarr's default skips
those), so a done unit whose chunk is absent is damage, never a result that happened to be NaN."""


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
        "cosines it was solved on) is below the optimum, from the solver's dual certificate; i < j"),
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
        "p_value": Quantity(
            ("layer", "expert"), "two-sided p-value of a paired t-test on the per-sequence loss differences "
            "(H0: removing this expert leaves the expected loss unchanged), before any correction", "float64"),
        "p_holm": Quantity(
            ("layer", "expert"), "p_value adjusted by Holm-Bonferroni over every (layer, expert) ablation of this "
            "group (the array's attributes: method, alpha, tests); <= alpha: the ablation changes the loss at "
            "family-wise error rate alpha", "float64"),
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
    with storage.storage_errors(url, StoreError, f"cannot look at the store {url}"):
        if not storage.is_local(url):
            return fs.exists(path)
        try:
            os.stat(path)  # ELOOP, ENOTDIR, EACCES are errors here; os.path.exists says False
        except FileNotFoundError:
            return False
        return True


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


def enclosing_store(url: str) -> str | None:
    """The moe-ray store that `url` would lie inside (one of its parent directories or prefixes),
    or None: a store made inside another's group would change that store's groups and counts."""
    fs, path = storage.filesystem(str(url))
    parts = path.rstrip("/").split("/")
    for n in range(len(parts) - 1, 0, -1):
        parent = "/".join(parts[:n]) or "/"
        try:
            if not fs.exists(f"{parent.rstrip('/')}/zarr.json"):
                continue
            with fs.open(f"{parent.rstrip('/')}/zarr.json", "rb") as f:
                if "moe_ray" in (json.loads(f.read()).get("attributes") or {}):
                    return parent if "://" not in str(url) else f"{str(url).split('://')[0]}://{parent}"
        except Exception:
            continue
    return None


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
    """Why the weights a store was made from differ from `identity` in config.json or layout (None:
    the same; their bytes are compared by `ResultStore.check_weights`), naming the model or the
    reference and what differs."""
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
        if a != b:
            return f"the {role}'s tensors of {unit} differ in names, dtypes or shapes"
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
        self._unit_arrays: dict[str, list[str]] = {}
        self._lost: dict[str, list[str]] = {}
        self.repairs: list[str] = []
        """What `done_array` found missing for done units, one line each (their flags are cleared)."""

    @property
    def rehearsal(self) -> bool:
        """True for a `dry_run` store (nothing is written; what would be sets `needs_write`)."""
        return self._scratch is not None

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

    def check_weights(self, checkpoints: "dict[str, Checkpoint | None]") -> None:
        """Refuse (StoreError naming the tensor) if any tensor a done unit read has other bytes in
        `checkpoints` (by role: model, reference) than when it was read: every recorded digest is
        recomputed from the checkpoint (`Checkpoint.piece_digests`, at read speed). Nothing cheaper
        cannot miss an edit: sizes and mtimes survive an in-place write, sampled bytes miss the rest."""
        for role, pieces in recorded_weights(self.root).items():
            ckpt = checkpoints.get(role)
            if ckpt is None:
                continue  # the identity check refused a store made with a role this job lacks
            unit_of = {k: unit for unit, keys in ckpt.unit_keys.items() for k in keys}
            order = {unit: i for i, unit in enumerate(ckpt.unit_keys)}
            base = lambda piece: piece.split("[", 1)[0]
            names = sorted(pieces, key=lambda p: (order.get(unit_of.get(base(p)), len(order)), p))
            current = ckpt.piece_digests(names)
            for piece in names:
                digest, reader = pieces[piece]
                if current.get(piece) != digest:
                    now = "is missing from it now" if current.get(piece) is None else "has other bytes now"
                    raise StoreError(
                        f"{self.url} holds results for other weights: the {role}'s tensor {piece} "
                        f"({unit_of.get(base(piece), 'other')}) differs from the one the store was made from "
                        f"({reader} read it; it {now}); pass --overwrite to replace the store, or choose "
                        "another --store")

    def check_identity(self, identity: dict, unit_keys: dict[str, dict[str, list[str]]] | None = None,
                       overwrite: bool = False) -> bool:
        """True if this store was made from the same weights as `identity`; False if not and
        `overwrite` (the caller replaces it); else a StoreError naming what differs. A store of
        another schema version is refused the same way (its layout is not this moe-ray's)."""
        schema = (self.root.attrs.get("moe_ray") or {}).get("schema_version")
        if schema != SCHEMA_VERSION:
            if overwrite:
                return False
            raise StoreError(f"{self.url} is a moe-ray store of schema version {schema!r}; this moe-ray reads and "
                             f"writes version {SCHEMA_VERSION}: pass --overwrite to replace it, or choose another --store")
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
        else:
            outer = enclosing_store(url)
            if outer is not None:
                raise StoreError(f"{url} lies inside the moe-ray store {outer}; a store inside another's groups "
                                 "would change that store's results: choose a --store outside it")
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

    def deleted(self) -> bool:
        """Whether the store's root metadata is gone: the store was deleted (`rm -rf`) while a run
        wrote into it, and the writes since then have left only loose chunks at its path."""
        return not _is_moe_ray_store(self.url)

    def start_run(self, spec: dict) -> None:
        """Log a run in the root's `runs` and mark the store as running; a run of a submitted job
        names the job (`JOB_ENV`), so `moe-ray status` tells its own run from others into the store."""
        import os

        runs = list(self.root.attrs.get("runs", []))
        job = {"job": os.environ[JOB_ENV]} if os.environ.get(JOB_ENV) else {}
        self.root.attrs.update({"runs": runs + [{"spec": _jsonable(spec), "started": _now(), **job}],
                                "state": "running", "error": None})

    def end_run(self, error: str | None = None, counts: dict[str, tuple[int, int]] | None = None) -> None:
        """Close the last run's log entry: `state` complete, or failed with its one-line `error`, and
        the units done/planned per analysis when it ended (`counts`)."""
        runs = list(self.root.attrs.get("runs", [])) or [{}]
        state = "failed" if error else "complete"
        runs[-1] = {**runs[-1], "ended": _now(), "state": state, **({"error": error} if error else {}),
                    **({"progress": {k: list(v) for k, v in counts.items()}} if counts is not None else {})}
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
        """A 1-D coordinate array named after its dimension (strings as variable-length UTF-8). An
        expert dimension (`EXPERT_DIMS`) given labels gets integer codes (`expert_codes`) as its
        coordinate and the labels beside it as `<dim>_label`; a store of schema 1 (string labels as the
        coordinate itself) is compared by its labels and left as it is."""
        values = np.asarray(values)
        if name in EXPERT_DIMS and values.dtype.kind in "UOT":
            labels = values.astype(str)
            if name in group and group[name].dtype.kind not in "iu":  # schema 1: the labels themselves
                values = labels
            else:
                ResultStore.coord(group, name, expert_codes(labels))
                ResultStore._label_coord(group, name, labels)
                return
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
    def _label_coord(group: zarr.Group, dim: str, labels: np.ndarray) -> None:
        """`<dim>_label`: the expert labels ("0".."E-1", "F", "SE") along `dim`, a non-index coordinate."""
        name = dim + "_label"
        if name in group:
            old = np.array([str(v) for v in np.asarray(group[name][...]).ravel()])
            if old.shape != labels.shape or not np.array_equal(old, labels):
                raise StoreError(f"coordinate {group.path}/{name} in the store is {_short(old)}, this job's is "
                                 f"{_short(labels)}; choose another --store, or --overwrite to replace it")
            return
        arr = group.create_array(name, shape=labels.shape, dtype=str, dimension_names=[dim],
                                 attributes={"description": EXPERT_LABEL_DOC})
        arr[...] = labels

    def array(self, group: zarr.Group, name: str, quantity: Quantity, unit_dims: tuple[str, ...],
              attrs: dict | None = None, chunks: dict[str, int] | None = None) -> zarr.Array:
        """The array for `quantity`, sized from the group's coordinates, chunked 1 along unit dims
        (or as `chunks` says for some of them: tiles of units that one task writes together).

        An array with unit dims is one the group's units write (`done_array` checks that every done
        unit's chunks of it are stored); one of those missing from a group with done units was
        deleted: it is made again, empty, and `done_array` names it and has its units recomputed."""
        shape = tuple(group[d].shape[0] for d in quantity.dims)
        if unit_dims:
            self._unit_arrays.setdefault(group.path, []).append(name)
        if name in group:
            arr = group[name]
            if tuple(arr.shape) != shape:
                raise StoreError(f"{group.path}/{name} has shape {arr.shape} in the store, this job needs {shape}")
            return arr
        if (name in group.attrs.get("unit_arrays", ()) and DONE in group) or \
                (name in (group.attrs.get(SUMMARY_ARRAYS) or ()) and group.attrs.get(SUMMARISED)):
            self._lost.setdefault(group.path, []).append(name)
        tile = chunks or {}
        chunks = tuple(min(n, tile.get(d, 1)) if d in unit_dims else n for d, n in zip(quantity.dims, shape))
        fill = np.nan if quantity.dtype.startswith("float") else 0
        if quantity.fill is not None:
            fill = quantity.fill
        if quantity.dtype == "str":
            dtype, fill = str, ""
        else:
            dtype = quantity.dtype
        labelled = [d + "_label" for d in quantity.dims if d in EXPERT_DIMS and d + "_label" in group]
        coordinates = {"coordinates": " ".join(labelled)} if labelled else {}  # CF: xarray makes them coordinates
        return group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
            dimension_names=list(quantity.dims),
            attributes={"description": quantity.description, **coordinates, **(attrs or {})})

    def done_array(self, group: zarr.Group, unit_dims: tuple[str, ...], planned: np.ndarray | None = None,
                   chunks: dict[str, int] | None = None) -> zarr.Array:
        """The group's `unit_done` flags and `unit_weights` records; with `planned` (a bool array of its
        shape: the cells this job runs, where that is not all of them), also `unit_planned`, which
        progress counts. Called once the group's arrays exist: every done unit must have its chunks of
        each of them stored; those that do not (a deleted array or chunk) have their flags cleared,
        so this run recomputes exactly them, and `repairs` says so."""
        done = self.array(group, DONE, Quantity(
            unit_dims, "1 where this work unit's results are complete (resume skips those)", "uint8"), unit_dims,
            attrs={"role": BOOKKEEPING}, chunks=chunks)
        self.array(group, WEIGHTS, Quantity(
            unit_dims, "the content digests (xxh3_128) of every tensor this unit read, as JSON by role "
            "(model, reference) and tensor; a resume recomputes them and refuses other weights", "str"),
            unit_dims, attrs={"role": BOOKKEEPING}, chunks=chunks)
        if planned is not None:
            planned = np.asarray(planned, dtype=np.uint8)
            if PLANNED in group and tuple(group[PLANNED].shape) == planned.shape:
                if not np.array_equal(group[PLANNED][...], planned):
                    group[PLANNED][...] = planned
            else:
                if PLANNED in group:
                    del group[PLANNED]
                arr = group.create_array(
                    PLANNED, shape=planned.shape, chunks=planned.shape, dtype="uint8", fill_value=0,
                    dimension_names=list(unit_dims),
                    attributes={"description": "1 where the latest job planned this unit (progress counts these)",
                                "role": BOOKKEEPING})
                arr[...] = planned
        written = [n for n in dict.fromkeys(self._unit_arrays.pop(group.path, [])) if n != DONE]
        self.check_units(group, unit_dims, written)
        self._lost.pop(group.path, None)
        return done

    def check_units(self, group: zarr.Group, unit_dims: tuple[str, ...], arrays: "Iterable[str]") -> None:
        """Record `arrays` as those the group's units write (its `unit_arrays`, which `store_status`
        checks) and find every done unit that lacks its chunk of one of them, or has it corrupt (a
        deleted array or chunk): their flags are cleared (and the corrupt chunks deleted, so the
        units never read them), so this run recomputes exactly them, and `repairs` says so. Called
        once the group's arrays and `unit_done` exist (`done_array` does, for groups made with it)."""
        written = list(dict.fromkeys(arrays))
        self._unit_arrays.pop(group.path, None)
        self._set_in(group, unit_arrays=written)
        lost = self._lost.get(group.path, [])
        damaged, why, corrupt = _unit_damage(group, unit_dims, written, lost)
        if why is None:
            return
        self.repairs.append(f"{group.path}: {why}: {int(damaged.sum())} done units will be recomputed")
        if self._scratch is not None:
            self.needs_write = True
            return
        self._delete_keys(corrupt)
        flags = np.asarray(group[DONE][...])
        flags[damaged] = 0
        group[DONE][...] = flags

    def check_summaries(self, group: zarr.Group, arrays: "Iterable[str]", stale: bool = False) -> None:
        """Record `arrays` as the group's summaries (`SUMMARY_ARRAYS`: what `finish` writes whole once
        every unit is done). If they were written (`SUMMARISED`) and one is now missing or lacks a chunk
        (named in `repairs`; corrupt chunks are deleted), or some unit of the group is not done (this
        run computes it), or `stale` (this run computes units they depend on elsewhere), the mark is
        cleared: they are written again at the end of this run, and until then the store is partial,
        not damaged. Called after `check_units`."""
        self._set_in(group, **{SUMMARY_ARRAYS: list(arrays)})
        lost = self._lost.pop(group.path, [])
        if not group.attrs.get(SUMMARISED):
            if self._scratch is not None and unit_done(group).all():
                self.needs_write = True  # every unit done, summaries never written: this run writes them
            return
        why, corrupt = missing_summaries(group, arrays, lost)
        if why is not None:
            self.repairs.append(f"{group.path}: {why}: its summaries will be computed again")
        if why is None and not stale and unit_done(group).all():
            return
        if self._scratch is not None:
            self.needs_write = True
            return
        self._delete_keys(corrupt)
        group.attrs[SUMMARISED] = False

    @staticmethod
    def mark_summarised(group: zarr.Group) -> None:
        """Say that `finish` has written the group's summaries over all its units (see `SUMMARISED`)."""
        ResultStore.set_attrs(group, **{SUMMARISED: True})

    def _set_in(self, group: zarr.Group, **values: Any) -> None:
        """`set_attrs`, or in a rehearsal (`dry_run`), `needs_write` if any would change."""
        if self._scratch is None:
            self.set_attrs(group, **values)
        elif any(group.attrs.get(k, _MISSING) != v for k, v in _jsonable(values).items()):
            self.needs_write = True

    def _delete_keys(self, keys: "Iterable[str]") -> None:
        from zarr.core.sync import sync

        for key in keys:
            sync(self.root.store.delete(key))

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


def store_runs(url: str) -> tuple[list[dict], str | None]:
    """The store's run log (`runs`, oldest first) and its `state`, read live; ([], None) while it
    does not exist or cannot be read."""
    try:
        if not _exists(url):
            return [], None
        root = zarr.open_group(_zarr_store(url, "r"), mode="r", use_consolidated=False)
        return list(root.attrs.get("runs") or []), root.attrs.get("state")
    except Exception:
        return [], None


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


def _stored_chunks(array: zarr.Array) -> set[str]:
    """The keys of the chunks of `array` that are stored (listed, not read)."""
    from zarr.core.sync import sync

    async def keys() -> set[str]:
        return {k async for k in array.store.list_prefix(f"{array.path}/c/")}

    return sync(keys())


READ_LIMIT = 16 * 2**20
"""Arrays of at most this many bytes (uncompressed) have the chunks they are checked for read, not only
listed, so a corrupt chunk (one that no longer decodes) is damage too; larger ones are only listed."""


def _chunk_check(arr: zarr.Array) -> Callable[[tuple[int, ...]], str | None]:
    """A function saying why chunk `index` of `arr` does not decode (None: it does, or `arr` is too big to
    read here). The whole array is read once first (zarr fetches its chunks concurrently: one round of
    requests on an object store, not one per unit); chunk by chunk only if that read fails."""
    def fine(index: tuple[int, ...]) -> None:
        return None

    if arr.nbytes > READ_LIMIT:
        return fine
    try:
        arr[...]
        return fine
    except Exception:
        pass

    def why(index: tuple[int, ...]) -> str | None:
        try:
            arr.get_block_selection(index)
            return None
        except Exception as exc:
            return _first_line(exc)
    return why


def missing_results(group: zarr.Group, unit_dims: tuple[str, ...], arrays: "Iterable[str]",
                    lost: "Iterable[str]" = ()) -> tuple[np.ndarray, str | None]:
    """Which done units of `group` lack results: a bool array over the unit dims (True: marked done,
    but one of `arrays` (the arrays its units write) is missing, or lacks that unit's chunk, or has it
    corrupt), and the first thing missing, named (None: every done unit's chunks are there). `lost`
    are arrays known to have been missing (made again empty since)."""
    damaged, first, _ = _unit_damage(group, unit_dims, arrays, lost)
    return damaged, first


def _unit_damage(group: zarr.Group, unit_dims: tuple[str, ...], arrays: "Iterable[str]",
                 lost: "Iterable[str]" = ()) -> tuple[np.ndarray, str | None, list[str]]:
    """`missing_results`, and the store keys of the corrupt chunks it found (a repair deletes them, so
    that the units rewriting them never have to read them)."""
    done = unit_done(group) if DONE in group else np.zeros(0, dtype=bool)
    damaged = np.zeros_like(done)
    first: str | None = None
    corrupt: list[str] = []
    if not done.any():
        return damaged, None, corrupt
    cells = np.argwhere(done)
    members = dict(group.arrays())
    for name in arrays:
        arr = members.get(name)
        if arr is None or name in lost:
            damaged |= done
            first = first or f"{group.path}/{name} is missing"
            continue
        dims = list(arr.metadata.dimension_names or ())
        if not set(unit_dims) <= set(dims):
            continue
        stored, unreadable = _stored_chunks(arr), _chunk_check(arr)
        unit_axes = [i for i, d in enumerate(dims) if d in unit_dims]
        # each done cell's chunk coordinates along the unit dims (a tile holds several cells)
        coords = np.stack([cells[:, unit_dims.index(dims[i])] // arr.chunks[i] for i in unit_axes], axis=1)
        unique, which = np.unique(coords, axis=0, return_inverse=True)
        for u, chunk in enumerate(unique):
            ranges = [range(arr.cdata_shape[i]) for i in range(len(dims))]
            for k, i in enumerate(unit_axes):
                ranges[i] = range(int(chunk[k]), int(chunk[k]) + 1)
            for index in np.ndindex(*(len(r) for r in ranges)):
                block = tuple(r[j] for r, j in zip(ranges, index))
                key = arr.metadata.encode_chunk_key(block)
                why = "is missing" if f"{arr.path}/{key}" not in stored else None
                if why is None:
                    broken = unreadable(block)
                    if broken is None:
                        continue
                    why = f"cannot be read ({broken})"
                    corrupt.append(f"{arr.path}/{key}")
                damaged[tuple(cells[which.ravel() == u].T)] = True
                first = first or f"chunk {arr.path}/{key} {why}"
                break
    return damaged, first, corrupt


def missing_summaries(group: zarr.Group, arrays: "Iterable[str]",
                      lost: "Iterable[str]" = ()) -> tuple[str | None, list[str]]:
    """The first of `arrays` (a group's summaries: written whole once its units are done) that is
    missing or lacks a chunk or has one corrupt, named (None: all whole), and the corrupt chunks' keys."""
    members = dict(group.arrays())
    corrupt: list[str] = []
    first: str | None = None
    for name in arrays:
        arr = members.get(name)
        if arr is None or name in lost:
            first = first or f"{group.path}/{name} is missing"
            continue
        stored, unreadable = _stored_chunks(arr), _chunk_check(arr)
        for index in np.ndindex(*arr.cdata_shape):
            key = f"{arr.path}/{arr.metadata.encode_chunk_key(index)}"
            if key not in stored:
                first = first or f"chunk {key} is missing"
                break
            broken = unreadable(index)
            if broken is not None:
                corrupt.append(key)
                first = first or f"chunk {key} cannot be read ({broken})"
                break
    return first, corrupt



def unit_label(group: zarr.Group, unit_dims: "Iterable[str]", cell: "Iterable[int]") -> str:
    """A done unit named by its coordinates: `static layer 0`, `reorder/joint layer 1 expert_i 0 expert_j 2`."""
    parts = [group.path]
    for dim, i in zip(unit_dims, cell):
        coord = dim + "_label" if dim + "_label" in group else dim  # "F", not its code -1
        value = group[coord][int(i)] if coord in group else i
        parts.append(f"{dim} {value}")
    return " ".join(parts)


def recorded_weights(root: zarr.Group) -> dict[str, dict[str, tuple[str, str]]]:
    """The content digests every done unit of the store recorded, by role and tensor piece, with the
    unit that recorded each (`(digest, unit label)`). Two units that recorded one tensor with two
    digests mean the store already mixes two weights: refused here."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    groups = _all_groups(root)
    for path, group in groups:  # a record for all of a group's units (causal: every unit reads the model)
        shared = group.attrs.get(WEIGHTS)
        if shared and any(unit_done(g).any() for p, g in groups if (p == path or p.startswith(path + "/"))
                          and DONE in g):
            for role, digests in shared.items():
                for piece, digest in digests.items():
                    out.setdefault(role, {}).setdefault(piece, (digest, f"{path} (its done units)"))
    for path, group in groups:
        if DONE not in group or WEIGHTS not in group:
            continue
        done = unit_done(group)
        if not done.any():
            continue
        records = np.asarray(group[WEIGHTS][...])
        dims = tuple(group[DONE].metadata.dimension_names or ())
        for cell in np.argwhere(done):
            text = records[tuple(cell)]
            if not text:
                continue  # no record: missing_results calls that damage
            for role, digests in json.loads(str(text)).items():
                mine = out.setdefault(role, {})
                for piece, digest in digests.items():
                    old = mine.get(piece)
                    if old is None:
                        mine[piece] = (digest, unit_label(group, dims, cell))
                    elif old[0] != digest:
                        raise StoreError(
                            f"{path}: the store already mixes two versions of the {role}'s tensor {piece}: "
                            f"{old[1]} and {unit_label(group, dims, cell)} read different bytes; pass "
                            "--overwrite to recompute it")
    return out


def _all_groups(root: zarr.Group) -> list[tuple[str, zarr.Group]]:
    return [(p, g) for p, g in root.members(max_depth=None) if isinstance(g, zarr.Group)]


def expert_codes(labels) -> np.ndarray:
    """Integer codes of expert labels: "3" -> 3, "F" -> -1, "SE" -> -2 (`EXPERT_CODES`)."""
    return np.array([EXPERT_CODES[l] if l in EXPERT_CODES else int(l) for l in map(str, labels)], dtype=np.int64)


def unit_done(group: zarr.Group) -> np.ndarray:
    """The group's done flags as a bool array over its unit dimensions."""
    return np.asarray(group[DONE][...]).astype(bool)


def store_status(url: str) -> dict[str, dict]:
    """Per analysis (the store's top-level groups), what the store holds: `state` (`complete`,
    `partial` (a run stopped or failed before its end, its units or its summaries not all written),
    `failed` (the last run failed), `running` (a live writer holds the store's lease), or `damaged` (a
    unit marked done lacks an array or chunk of its results, or has it corrupt; or summaries marked
    written lack one)), `done` and `planned` units, `damage` (the first thing missing, else None) and
    `text` (`complete`, `partial 76/168`, `damaged: chunk ... is missing`). Empty for a store that
    does not exist or cannot be read."""
    from .lease import holder

    if not _exists(url):
        return {}
    try:
        root = zarr.open_group(_zarr_store(url, "r"), mode="r", use_consolidated=False)
        counts = progress(root)
        groups = _all_groups(root)
    except Exception:
        return {}
    root_state = root.attrs.get("state")
    try:
        live = holder(url) is not None
    except Exception:  # a lease that cannot be read says nothing about the store
        live = False
    out: dict[str, dict] = {}
    for name, (done, planned) in counts.items():
        damage = None
        for path, group in groups:
            if (path == name or path.startswith(name + "/")) and DONE in group:
                dims = tuple(group[DONE].metadata.dimension_names or ())
                try:
                    _, damage = missing_results(group, dims, group.attrs.get("unit_arrays", ()))
                except Exception as exc:
                    damage = f"{path} cannot be listed: {_first_line(exc)}"
                if damage:
                    break
        unsummarised = None
        for path, group in groups:
            if damage or not (path == name or path.startswith(name + "/")):
                continue
            summaries = group.attrs.get(SUMMARY_ARRAYS) or ()
            try:
                if summaries and group.attrs.get(SUMMARISED):
                    damage = missing_summaries(group, summaries)[0]
                elif summaries and DONE in group and unit_done(group).all():
                    unsummarised = unsummarised or path
            except Exception as exc:
                damage = f"{path} cannot be listed: {_first_line(exc)}"
        if damage:
            state, text = "damaged", f"damaged: {damage}"
        elif done == planned and unsummarised is None:
            state, text = "complete", "complete"
        else:
            state = "running" if live else "failed" if root_state == "failed" else "partial"
            text = f"{state} {done}/{planned}" + (f" ({unsummarised}: summaries not written)"
                                                  if done == planned else "")
        out[name] = {"state": state, "done": done, "planned": planned, "damage": damage, "text": text}
    return out


def open_results(url: str, storage_options: dict | None = None) -> "xr.DataTree":
    """The whole store as an `xarray.DataTree` (groups static, reorder/<mode>, dynamic/<input>), as
    xarray users expect it (a URL is opened with `storage_options`; default: the filesystem's own
    credentials, AWS_* for s3://): expert dimensions select by code or by label (`.sel(expert_i=0)`,
    `.sel(expert_i_label="F")`: the labels are indexed), the bookkeeping arrays (`unit_done`,
    `unit_planned`) are coordinates rather than data variables, and attributes holding tables or
    lists of tables (the spec, the run log, parameters) are JSON strings, so `to_netcdf` takes every
    group (`json.loads` gives them back). Its attrs' `moe_ray_status` (JSON) says per analysis whether
    it is complete (`store_status`); a store that is not is opened with a warning naming what it lacks."""
    import xarray as xr  # here, not at the top: workers writing the store never need it

    url = str(url)
    with storage.use_storage_options(storage_options or storage.storage_options()):
        if not _exists(url) or not _is_moe_ray_store(url):
            raise StoreError(f"{url} is not a moe-ray store")
        extra = {"storage_options": storage.options_for(url)} if not storage.is_local(url) else {}
        tree = xr.open_datatree(url, engine="zarr", consolidated=None, **extra)
        status = store_status(url)
    unfinished = {name: s["text"] for name, s in status.items() if s["state"] != "complete"}
    if unfinished:
        warnings.warn(f"{url} is not complete: " + "; ".join(f"{k} {v}" for k, v in unfinished.items()),
                      IncompleteStoreWarning, stacklevel=2)
    tree = tree.map_over_datasets(_as_xarray_expects)
    tree.attrs["moe_ray_status"] = json.dumps({name: s["text"] for name, s in status.items()})
    return tree


class IncompleteStoreWarning(UserWarning):
    """`open_results` of a store some analysis of which is partial, failed, running or damaged."""


def _netcdf_attrs(attrs: dict) -> dict:
    """Attributes netCDF takes: strings, numbers and lists of numbers as they are; anything else (tables,
    lists of strings or of tables, None, booleans) as its JSON text."""
    def plain(v: Any) -> bool:
        return isinstance(v, (str, int, float)) and not isinstance(v, bool)

    def numbers(v: Any) -> bool:  # netCDF attributes may be lists of numbers, not of strings
        return isinstance(v, list) and bool(v) and all(plain(x) and not isinstance(x, str) for x in v) \
            and len({type(x) for x in v}) == 1

    return {k: v if plain(v) or numbers(v) else json.dumps(v, default=str) for k, v in attrs.items()}


def _as_xarray_expects(ds: "xr.Dataset") -> "xr.Dataset":
    """One group of `open_results`: bookkeeping arrays as coordinates, label coordinates indexed,
    netCDF-compatible attributes."""
    bookkeeping = [n for n, v in ds.data_vars.items()
                   if v.attrs.get("role") == BOOKKEEPING or n in (DONE, PLANNED, WEIGHTS)]
    ds = ds.set_coords(bookkeeping)
    for dim in EXPERT_DIMS:
        label = dim + "_label"
        if label in ds.variables and label not in ds.xindexes:
            ds = ds.set_coords(label).set_xindex(label)
    ds.attrs = _netcdf_attrs(dict(ds.attrs))
    for name in ds.variables:
        ds[name].attrs = _netcdf_attrs(dict(ds[name].attrs))
    return ds
