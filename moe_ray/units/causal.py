"""The causal checks of the paper's claims (beyond the paper) as layer-shard actors.

The corpus (`dynamic.corpus_file`, or the one moe-ray ships) runs through the same layer shards as the
dynamic analyses. One pipeline item is one sequence and a chunk of its interventions: the first shard
embeds the tokens, and every shard runs its layers on a batch whose row 0 is the unmodified model and
whose other rows are interventions, each created at the layer it changes as a copy of row 0's input
there (`runtime.causal.run_rows`): the layers before an intervention run once per item, not once per
intervention. The last shard turns every row into a next-token loss with the output head and writes
the item's results; nothing is kept between items, so an item that runs again (a restarted shard, a
lost node) writes the same values.

Units, each with its done flag (a resumed job runs only what is missing):
- `causal` [sequence]: the unmodified model's loss of each sequence;
- `causal/norm_routing` [layer]: the gate's top-k against the top-k by expert output norm, and the loss
  with the layer routing by norm;
- `causal/norm_routing_all` [sequence]: the loss with every analysed layer routing by norm;
- `causal/ablation` [layer, expert]: the loss with the expert (and the shared expert, SE) removed;
- `causal/agreement` [layer]: the outputs' D1/D2 similarity over the corpus beside S1's.
A unit covering several sequences is marked done by the last shard once all its cells are written.
`finish` turns the losses into changes of the corpus loss with bootstrap intervals and the similarities
into Pearson R per layer.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..analysis import causal as C
from ..analysis.static import matrix_similarity, upper_triangle_pearson
from ..checkpoint import MATRICES, Checkpoint, open_checkpoint
from ..distributed.fanout import Unit
from ..distributed.pipeline import run_pipeline
from ..distributed.placement import Demand, Resources
from ..errors import SpecError
from ..progress import counter
from ..runtime import LayerRange
from ..runtime.causal import LOGIT_ELEMENTS, SHARED, OutputHead, Variant, run_rows
from ..spec import CausalOptions, Spec
from ..store import CAUSAL_SCHEMA, DONE, WEIGHTS, Quantity, ResultStore, unit_done
from ..fs import set_storage_options
from .dynamic import CORPUS, DynamicPlan, TokenizedInput, _cluster_gpus, plan_dynamic
from .job import AnalysisJob, WeightsRecord

GROUP = "causal"
NORM, NORM_ALL, ABLATION, AGREEMENT = (f"{GROUP}/{g}" for g in ("norm_routing", "norm_routing_all", "ablation",
                                                                 "agreement"))
CHECK_GROUPS = {"norm_routing": (NORM, NORM_ALL), "ablation": (ABLATION,), "agreement": (AGREEMENT,)}
UNIT_DIMS = {GROUP: ("sequence",), NORM: ("layer",), NORM_ALL: ("sequence",), ABLATION: ("layer", "expert"),
             AGREEMENT: ("layer",)}
CHUNKED_BY = {"output_similarity_sum": ("layer", "sequence"), "weight_similarity": ("layer",)}
"""Chunking of the arrays several writers fill (by the unit that writes them); every other causal array
has one writer, the last shard (the driver's summaries come after it), and is one chunk."""
SUMMARIES = {GROUP: ("sequence_tokens", "text"), NORM: ("agreement", "match_rate", "delta_loss"),
             NORM_ALL: ("delta_loss",), ABLATION: ("delta_loss",), AGREEMENT: ("output_similarity", "correlation")}
"""Each group's arrays written whole, not by its units: `finish`'s summaries over every unit (and the
corpus facts the driver writes once). The store checks them only once `finish` has written them
(`ResultStore.check_summaries`); every other array of a group is its units' results, checked per done unit."""
OUTPUTS = ("cosine", "angular")
"""The `output` coordinate: D1's per-token cosine and D2's angular similarity, averaged over the corpus."""
LAYER_TEMPORARIES = 16
"""Hidden-state-sized temporaries of one decoder layer's forward (q, k, v, MLP intermediates, ...)."""


@dataclass(frozen=True)
class CausalItem:
    """One pipeline item: sequence `sequence` with the interventions `variants` (in layer order);
    `capture` lists the layers whose unmodified outputs this item measures (top-k agreement, D1/D2)."""

    name: str
    sequence: int
    variants: tuple[Variant, ...]
    capture: tuple[int, ...]

    def new_rows(self) -> dict[int, list[Variant]]:
        rows: dict[int, list[Variant]] = {}
        for v in self.variants:
            rows.setdefault(v.layer, []).append(v)
        return rows


@dataclass(frozen=True)
class CausalPlan:
    """Everything a causal shard actor needs, small and picklable: the dynamic plan of the corpus
    (shards, devices, the MoE layers analysed) and the causal options."""

    base: DynamicPlan
    checks: tuple[str, ...]
    labels: tuple[str, ...]  # the ablation's experts: routed "0".."E-1", then "SE" where there is one
    options: CausalOptions

    @property
    def layers(self) -> tuple[int, ...]:
        return self.base.layers

    @property
    def sequences(self) -> tuple[TokenizedInput, ...]:
        return self.base.inputs

    @property
    def routed(self) -> tuple[str, ...]:
        return tuple(lab for lab in self.labels if lab != SHARED)

    def tokens(self) -> np.ndarray:
        """Predicted tokens of each sequence (its length - 1)."""
        return np.array([len(s.ids) - 1 for s in self.sequences], dtype=np.int64)

    def variants_per_item(self, sequence: int) -> int:
        """Interventions pushed through the layers together with a sequence (`batch_tokens`)."""
        return max(1, self.options.batch_tokens // len(self.sequences[sequence].ids) - 2)


def shard_label(plan: CausalPlan, shard: int) -> str:
    start, end = plan.base.shards[shard]
    return f"causal shard {shard} of {len(plan.base.shards)} (layers {start}-{end - 1})"


def plan_causal(ckpt: Checkpoint, spec: Spec, layers: tuple[int, ...]) -> CausalPlan:
    """Validate what the causal checks need (the corpus, the tokenizer, the decoder layers, the output
    head) and size the shards: the dynamic plan of the corpus, the head on the last shard, and the
    activations of one item (a batch of `batch_tokens` interventions)."""
    corpus_spec = spec.replace(dynamic=dataclasses.replace(spec.dynamic, inputs=[CORPUS]))
    base = plan_dynamic(ckpt, None, corpus_spec, layers)
    facts, family = ckpt.facts, ckpt.family
    head_keys = [family.final_norm_key(), family.output_head_key(ckpt.config)]
    ckpt.require(head_keys, "the output head")
    head_bytes = sum(int(np.prod(ckpt.info(k).shape)) * 4 for k in head_keys)
    longest = max(len(s.ids) for s in base.inputs)
    rows = max(2, spec.causal.batch_tokens // longest) + 1
    heads = int(family.text_config(ckpt.config).get("num_attention_heads") or 1)
    activation = (rows * longest * (facts.d_hid * LAYER_TEMPORARIES + heads * longest) * 4
                  + longest * facts.num_experts * (facts.d_hid * 3 + facts.num_experts) * 8
                  + 2 * min(LOGIT_ELEMENTS, longest * facts.vocab_size) * 4 + base.activation_bytes)
    weights = base.shard_weight_bytes[:-1] + (base.shard_weight_bytes[-1] + head_bytes,)
    base = dataclasses.replace(base, shard_weight_bytes=weights, activation_bytes=activation)
    labels = tuple(str(e) for e in range(facts.num_experts))
    if facts.shared_d_mid and family.shared_key:
        labels += (SHARED,)
    return CausalPlan(base, tuple(dict.fromkeys(spec.causal.checks)), labels, spec.causal)


# ---- the store -----------------------------------------------------------------------------------

def corpus_digest(plan: CausalPlan) -> str:
    return hashlib.sha256("".join(s.sha256 for s in plan.sequences).encode()).hexdigest()


def groups_of(plan: CausalPlan) -> list[str]:
    return [GROUP] + [g for check in plan.checks for g in CHECK_GROUPS[check]]


def prepare(store: ResultStore, plan: CausalPlan, overwrite: bool = False) -> dict[str, np.ndarray]:
    """Create the causal groups, coordinates and arrays; return each group's done flags."""
    params = {"corpus_sha256": corpus_digest(plan), "sequences": len(plan.sequences),
              "tokens": int(plan.tokens().sum()), "dtype": plan.base.options.dtype}
    coords = {"sequence": np.arange(len(plan.sequences), dtype=np.int64),
              "layer": np.array(plan.layers, dtype=np.int64), "stat": np.array(C.STATS),
              "expert": np.array(plan.labels), "expert_i": np.array(plan.routed), "expert_j": np.array(plan.routed),
              "matrix": np.array(MATRICES), "output": np.array(OUTPUTS)}
    done, groups = {}, {}
    for path in groups_of(plan):
        group = store.group(path, dict(params, labels=list(plan.labels)) if path == ABLATION else params,
                            overwrite=overwrite)
        schema = CAUSAL_SCHEMA[path]
        for dim in sorted({d for q in schema.values() for d in q.dims} | set(UNIT_DIMS[path])):
            store.coord(group, dim, coords[dim])
        for name, quantity in schema.items():
            store.array(group, name, quantity, CHUNKED_BY.get(name, ()))
        store.array(group, DONE, Quantity(UNIT_DIMS[path], "1 where this work unit's results are complete "
                                          "(resume skips those)", "uint8"), ())
        store.check_units(group, UNIT_DIMS[path], [n for n in schema if n not in SUMMARIES[path]])
        done[path], groups[path] = unit_done(group), group
    work = not all(d.all() for d in done.values())  # every group's summaries use the corpus's normal loss
    for path, group in groups.items():
        store.check_summaries(group, SUMMARIES[path], stale=work)
    root = groups[GROUP]
    record_weights(store, root, any(d.any() for d in done.values()), plan.base.model)
    if "text" not in root:  # what each sequence is (written once, with the group)
        arr = root.create_array("text", shape=(len(plan.sequences),), dtype=str, dimension_names=["sequence"],
                                attributes={"description": "each corpus sequence's text"})
        arr[...] = np.array([_text(s) for s in plan.sequences], dtype=object)
    if not (np.asarray(root["sequence_tokens"][...]) == plan.tokens()).all():
        root["sequence_tokens"][...] = plan.tokens()
    return done


def record_weights(store: ResultStore, root, any_done: bool, model: str) -> None:
    """The content digests of the whole model in the causal group's `unit_weights` attribute: every
    causal unit runs the model end to end. Taken by the driver before the first unit runs (a fresh
    causal group, or one with no unit done), kept while units are done (a resume checks them first:
    `ResultStore.check_weights`)."""
    if any_done and root.attrs.get(WEIGHTS):
        return
    if store.rehearsal:  # the real run takes them, once
        store.needs_write = True
        return
    ckpt = open_checkpoint(model)
    record = WeightsRecord()
    record.add("model", ckpt, sorted(ckpt.stored))
    store.set_attrs(root, **{WEIGHTS: record.digests})


def _text(sequence: TokenizedInput) -> str:
    return "".join(sequence.tokens).replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n")


# ---- the shard actors ----------------------------------------------------------------------------

class CausalShard:
    """A Ray actor holding layers [start, end) of the model (the output head too on the last shard);
    `run` pushes one item through them. A load error is kept and raised by `run` (see ShardWorker)."""

    def __init__(self, plan: CausalPlan, shard: int, device: str, agreement_layers: tuple[int, ...] = ()):
        set_storage_options(plan.base.storage_options)  # this actor opens URLs as the driver does
        self.plan = plan
        self.label = shard_label(plan, shard)
        self.last = shard == len(plan.base.shards) - 1
        self.load_error: Exception | None = None
        start, end = plan.base.shards[shard]
        try:
            if device == "cuda" and not torch.cuda.is_available():
                if plan.base.options.device == "cuda":
                    raise SpecError(f"{self.label} was given a GPU by Ray but torch sees no CUDA device")
                device = "cpu"
            dtype = plan.base.dtype_for(device)
            self.runner = LayerRange(open_checkpoint(plan.base.model), start, end, None, plan.layers, device, dtype)
            self.head = OutputHead(open_checkpoint(plan.base.model), device) if self.last else None  # float32
            self.store = ResultStore(plan.base.store)
            self._write_weight_similarity([l for l in agreement_layers if start <= l < end])
        except Exception as exc:
            self.load_error = exc

    def __repr__(self) -> str:
        return self.label

    def _write_weight_similarity(self, layers: list[int]) -> None:
        """S1 among the routed experts of this shard's layers (each layer's chunk is this shard's)."""
        for layer in layers:
            stacks = [w.detach() for w in self.runner.family.expert_stacks(self.runner.family.moe_block(self.runner.layers[layer]))]
            by_matrix = dict(zip(("gate", "up", "down"), stacks))
            sims = [matrix_similarity(list(by_matrix[m].unbind(0))).cpu().numpy() for m in MATRICES]
            self.store.root[AGREEMENT]["weight_similarity"][self.plan.layers.index(layer)] = np.stack(sims)

    def run(self, name: str, payload: dict):
        """An item's batch in (token ids on the first shard), the batch after this shard's layers out;
        the last shard writes the item's losses and measurements and returns a short summary."""
        if self.load_error is not None:
            raise self.load_error
        item: CausalItem = payload["item"]
        ids = torch.tensor(payload["ids"], dtype=torch.long)
        if self.runner.start == 0:
            hidden, rows, stats = self.runner.embed(ids), [None], {}
        else:
            hidden, rows, stats = payload["hidden"], payload["rows"], payload["stats"]
        capture = [l for l in item.capture if l in self.runner.layers]
        hidden, rows, captures = run_rows(self.runner, hidden, rows, item.new_rows(), self.plan.layers, capture)
        k = self.plan.base.facts.top_k
        E = self.plan.base.facts.num_experts
        for layer, cap in captures.items():
            gate = cap.topk_experts
            routed = cap.outputs[:, :E]
            overlap, match = C.topk_overlap(gate, C.topk_by_norm(cap.norms[:, :E], k), E)
            cos_sum, ang_sum = C.output_similarity_sums(routed)
            stats[layer] = {"overlap": overlap, "match": match, "tokens": routed.shape[0],
                            "similarity": torch.stack([cos_sum, ang_sum]).cpu().numpy()}
        if not self.last:
            return {"item": item, "ids": payload["ids"], "hidden": hidden.cpu(), "rows": rows, "stats": stats}
        nll = self.head.nll(hidden, ids).numpy()
        self._write(item, rows, nll, stats)
        return {"sequence": item.sequence, "rows": len(rows)}

    # ---- writing (the last shard only: every array of causal/* but S1 has this one writer) ---------
    def _write(self, item: CausalItem, rows: list, nll: np.ndarray, stats: dict) -> None:
        """Write one item's losses and measurements, then set the done flag of every unit it
        completes. The last shard is the only writer of these arrays (one chunk each), so each is
        read, updated and written back whole: a handful of store operations per item."""
        root, s, layers = self.store.root, item.sequence, self.plan.layers
        with _Updating(root) as up:
            up[GROUP, "loss"][s] = nll[0]
            up[GROUP, DONE][s] = 1
            for variant, value in zip(rows[1:], nll[1:]):
                li = layers.index(variant.layer)
                if variant.kind == "norm_all":
                    up[NORM_ALL, "loss"][s] = value
                    up[NORM_ALL, DONE][s] = 1
                elif variant.kind == "norm":
                    up[NORM, "loss"][li, s] = value
                else:
                    up[ABLATION, "loss"][li, self.plan.labels.index(variant.expert), s] = value
            for layer, st in stats.items():
                li = layers.index(layer)
                if NORM in root:
                    up[NORM, "topk_overlap"][li, s] = st["overlap"]
                    up[NORM, "topk_match"][li, s] = st["match"]
                if AGREEMENT in root:
                    up[AGREEMENT, "tokens"][li, s] = st["tokens"]
                    root[AGREEMENT]["output_similarity_sum"][li, s] = st["similarity"].astype(np.float32)
            # units over every sequence are done once all their cells are written
            if (ABLATION, "loss") in up:
                up[ABLATION, DONE][...] = np.isfinite(up[ABLATION, "loss"]).all(axis=-1)
            if (NORM, "loss") in up or (NORM, "topk_overlap") in up:
                up[NORM, DONE][...] = (np.isfinite(up[NORM, "loss"]).all(axis=-1)
                                       & (up[NORM, "topk_overlap"] >= 0).all(axis=-1))
            if (AGREEMENT, "tokens") in up:
                up[AGREEMENT, DONE][...] = ((up[AGREEMENT, "tokens"] > 0).all(axis=-1)
                                            & np.isfinite(np.asarray(root[AGREEMENT]["weight_similarity"][...]))
                                            .all(axis=(1, 2, 3)))


class _Updating:
    """Whole arrays of a store group read on first use, changed in memory and written back (only
    those that changed) when the block ends: `up[group, name][index] = value`."""

    def __init__(self, root):
        self.root = root
        self.arrays: dict[tuple[str, str], np.ndarray] = {}
        self.before: dict[tuple[str, str], np.ndarray] = {}

    def __enter__(self) -> "_Updating":
        return self

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.arrays

    def __getitem__(self, key: tuple[str, str]) -> np.ndarray:
        if key not in self.arrays:
            values = np.asarray(self.root[key[0]][key[1]][...])
            self.before[key], self.arrays[key] = values.copy(), values
        return self.arrays[key]

    def __exit__(self, kind, *_) -> None:
        if kind is not None:
            return
        for (group, name), values in self.arrays.items():
            if not np.array_equal(values, self.before[(group, name)], equal_nan=values.dtype.kind == "f"):
                self.root[group][name][...] = values


# ---- the job ---------------------------------------------------------------------------------------

class CausalJob(AnalysisJob):
    """The causal checks of a run: the corpus through the layer-shard actors, interventions batched."""

    name = "causal"

    def __init__(self, plan: CausalPlan, cpus_per_shard: int = 1):
        self.plan = plan
        self.cpus = cpus_per_shard

    def _memory(self) -> int:
        return int(max(b["memory"] for b in self.plan.base.bundles(self.cpus, _cluster_gpus())))

    def units(self) -> list[Unit]:
        """Every unit, as (group, index) with a label; memory is a shard's."""
        plan, memory = self.plan, self._memory()
        S = range(len(plan.sequences))
        units = [Unit(f"causal sequence {s}", (GROUP, (s,)), memory) for s in S]
        if "norm_routing" in plan.checks:
            units += [Unit(f"causal norm routing layer {l}", (NORM, (i,)), memory) for i, l in enumerate(plan.layers)]
            units += [Unit(f"causal norm routing (all layers) sequence {s}", (NORM_ALL, (s,)), memory) for s in S]
        if "ablation" in plan.checks:
            units += [Unit(f"causal ablation layer {l} expert {e}", (ABLATION, (i, j)), memory)
                      for i, l in enumerate(plan.layers) for j, e in enumerate(plan.labels)]
        if "agreement" in plan.checks:
            units += [Unit(f"causal agreement layer {l}", (AGREEMENT, (i,)), memory) for i, l in enumerate(plan.layers)]
        return units

    def demand(self, spec: Spec, nodes: Sequence[Resources] = ()) -> Demand:
        gpus = sum(node.get("GPU", 0) for node in nodes) if nodes else _cluster_gpus()
        base = self.plan.base
        labels = [shard_label(self.plan, s) for s in range(len(base.shards))]
        return Demand(f"causal ({len(labels)} shards on {base.device_for(gpus)}, {base.options.placement})",
                      tuple(zip(labels, base.bundles(self.cpus, gpus))), base.options.placement)

    def prepare(self, store: ResultStore, overwrite: bool) -> list[Unit]:
        done = prepare(store, self.plan, overwrite)
        return [u for u in self.units() if not done[u.args[0]][u.args[1]]]

    def items(self, pending: list[Unit]) -> list[CausalItem]:
        """The pipeline items for the pending units: per sequence, its pending interventions in layer
        order, cut into chunks of `variants_per_item`; the first chunk also measures the layers whose
        top-k agreement or output similarity is pending (and carries the all-layers norm routing)."""
        plan = self.plan
        todo: dict[str, set] = {}
        for u in pending:
            todo.setdefault(u.args[0], set()).add(u.args[1])
        layers = plan.layers
        capture = tuple(l for i, l in enumerate(layers) if (i,) in todo.get(NORM, ()) or (i,) in todo.get(AGREEMENT, ()))
        per_layer: list[Variant] = []
        for i, layer in enumerate(layers):
            if (i,) in todo.get(NORM, ()):
                per_layer.append(Variant("norm", layer))
            per_layer += [Variant("ablate", layer, e) for j, e in enumerate(plan.labels) if (i, j) in todo.get(ABLATION, ())]
        items = []
        for s in range(len(plan.sequences)):
            first = [Variant("norm_all", layers[0])] if (s,) in todo.get(NORM_ALL, ()) else []
            size = plan.variants_per_item(s)
            chunks = [per_layer[a:a + size] for a in range(0, len(per_layer), size)] or [[]]
            if not (first or capture or per_layer or (s,) in todo.get(GROUP, ())):
                continue
            for c, chunk in enumerate(chunks):
                items.append(CausalItem(f"s{s:05d}c{c:03d}", s, tuple((first if c == 0 else []) + chunk),
                                        capture if c == 0 else ()))
        return items

    def execute(self, pending: list[Unit], spec: Spec) -> None:
        """Push every item through the shard actors (all in flight at once)."""
        items = self.items(pending)
        if not items:
            return
        base = self.plan.base
        gpus = _cluster_gpus()
        device = base.device_for(gpus)
        agreement = tuple(self.plan.layers[u.args[1][0]] for u in pending if u.args[0] == AGREEMENT)
        shards = range(len(base.shards))
        left: dict[int, int] = {}  # a sequence's items not yet through the last shard
        for it in items:
            left[it.sequence] = left.get(it.sequence, 0) + 1
        sequence_of = {it.name: it.sequence for it in items}
        bar = counter(len(left), "causal sequences", "sequence", spec.progress)

        def on_step(shard: int, name: str) -> None:
            if shard == len(base.shards) - 1:
                left[sequence_of[name]] -= 1
                if left[sequence_of[name]] == 0:
                    bar.update()

        with bar:
            run_pipeline(CausalShard, [(self.plan, s, device, agreement) for s in shards],
                         base.bundles(self.cpus, gpus),
                         [(it.name, {"item": it, "ids": self.plan.sequences[it.sequence].ids}) for it in items],
                         strategy=base.options.placement, labels=[shard_label(self.plan, s) for s in shards],
                         on_step=on_step)

    def finish(self, store: ResultStore) -> str:
        return write_summaries(store, self.plan)


# ---- summaries (the driver, once every unit is done) ---------------------------------------------

def write_summaries(store: ResultStore, plan: CausalPlan) -> str:
    """Loss changes with bootstrap intervals, top-k agreement rates, corpus-mean output similarity and
    its Pearson R with S1; group attributes saying what was computed and how. Returns one line."""
    root, opts = store.root, plan.options
    tokens = np.asarray(root[GROUP]["sequence_tokens"][...], dtype=np.float64)
    normal = np.asarray(root[GROUP]["loss"][...], dtype=np.float64)
    corpus_loss = C.corpus_loss(normal, tokens)
    boot = {"resamples": opts.bootstrap_resamples, "seed": opts.bootstrap_seed, "level": opts.confidence,
            "method": "percentile bootstrap over sequences (resampled with replacement, the same resamples for "
                      "every intervention); change of loss = sum(loss - normal loss) / sum(tokens), nats per token"}

    def delta(losses: np.ndarray) -> np.ndarray:
        return C.bootstrap_delta(losses, normal, tokens, opts.bootstrap_resamples, opts.bootstrap_seed, opts.confidence)

    ckpt = open_checkpoint(plan.base.model)
    semantics = ckpt.family.intervention_semantics(ckpt.config)
    ResultStore.set_attrs(root[GROUP], loss=corpus_loss, loss_unit="nats per predicted token",
                          routing=plan.base.facts.routing, interventions=semantics, bootstrap=boot,
                          corpus=plan.base.options.corpus_file or "moe-ray's built-in corpus (moe_ray/data/corpus.jsonl)")
    parts = [f"loss {corpus_loss:.4f} nats/token over {len(plan.sequences)} sequences ({int(tokens.sum())} tokens)"]
    if NORM in root:
        g = root[NORM]
        all_tokens = (tokens + 1).sum()  # the agreement counts every token, the last one too
        k = plan.base.facts.top_k
        agreement = np.asarray(g["topk_overlap"][...], dtype=np.float64).sum(axis=1) / (k * all_tokens)
        match = np.asarray(g["topk_match"][...], dtype=np.float64).sum(axis=1) / all_tokens
        g["agreement"][...] = agreement.astype(np.float32)
        g["match_rate"][...] = match.astype(np.float32)
        d = delta(np.asarray(g["loss"][...]))
        g["delta_loss"][...] = d.astype(np.float32)
        ResultStore.set_attrs(g, bootstrap=boot)
        ga = root[NORM_ALL]
        d_all = delta(np.asarray(ga["loss"][...]))
        ga["delta_loss"][...] = d_all.astype(np.float32)
        ResultStore.set_attrs(ga, bootstrap=boot, estimate=float(d_all[0]), low=float(d_all[1]), high=float(d_all[2]))
        parts.append(f"gate/norm top-{k} agreement {agreement.min():.2f}-{agreement.max():.2f}; norm routing Δloss "
                     f"all layers {d_all[0]:+.4f} [{d_all[1]:+.4f}, {d_all[2]:+.4f}]")
    if ABLATION in root:
        g = root[ABLATION]
        d = delta(np.asarray(g["loss"][...]))
        g["delta_loss"][...] = d.astype(np.float32)
        ResultStore.set_attrs(g, bootstrap=boot)
        li, ei = np.unravel_index(np.nanargmax(d[..., 0]), d.shape[:2])
        parts.append(f"largest ablation Δloss {d[li, ei, 0]:+.4f} (layer {plan.layers[li]} expert {plan.labels[ei]})")
        parts.append(write_ablation_tests(g, normal, round(1 - opts.confidence, 12), d))  # 0.05, not 0.0500…044
    if AGREEMENT in root:
        g = root[AGREEMENT]
        sums = np.asarray(g["output_similarity_sum"][...], dtype=np.float64)
        counts = np.asarray(g["tokens"][...], dtype=np.float64).sum(axis=1)
        mean = sums.sum(axis=1) / counts[:, None, None, None]
        g["output_similarity"][...] = mean.astype(np.float32)
        weights = np.asarray(g["weight_similarity"][...], dtype=np.float64)
        r = np.array([[[upper_triangle_pearson(torch.from_numpy(weights[l, m]), torch.from_numpy(mean[l, o]))
                        for o in range(len(OUTPUTS))] for m in range(len(MATRICES))] for l in range(len(plan.layers))])
        g["correlation"][...] = r.astype(np.float32)
        r2 = {f"{m}/{o}": float(np.nanmean(r[:, mi, oi] ** 2)) for mi, m in enumerate(MATRICES)
              for oi, o in enumerate(OUTPUTS)}
        ResultStore.set_attrs(g, r2_mean=r2, tokens=int(counts[0]) if len(counts) else 0)
        parts.append(f"weight-output R² (mean over layers) gate/angular {r2['gate/angular']:.2f}")
    for path in groups_of(plan):  # last: the store checks the summaries from now on
        ResultStore.mark_summarised(root[path])
    return "causal: " + "; ".join(parts)


def write_ablation_tests(group, normal: np.ndarray, alpha: float, delta: np.ndarray) -> str:
    """Each ablation's paired t-test p-value and its Holm-Bonferroni adjustment over all of the group's
    ablations (`analysis.causal`), with what was done in the attributes (the group's `multiple_comparison`,
    and method, alpha, tests on `p_holm`); `delta` [layer, expert, stat] gives the uncorrected count beside
    (bootstrap intervals excluding 0). Returns the summary's phrase."""
    p = C.paired_t_pvalues(np.asarray(group["loss"][...], dtype=np.float64), normal, C.loss_resolution(normal))
    adjusted = C.holm_adjusted(p)
    group["p_value"][...] = p
    group["p_holm"][...] = adjusted
    tests = int(np.isfinite(p).sum())
    changed = int((adjusted <= alpha).sum())
    excludes_0 = int(((delta[..., 1] > 0) | (delta[..., 2] < 0)).sum())
    method = {"method": "Holm-Bonferroni", "alpha": float(alpha), "tests": tests}
    ResultStore.set_attrs(group, multiple_comparison={
        **method, "test": "two-sided paired t-test on the per-sequence loss differences (S - 1 degrees of freedom); "
                          f"differences within {C.LOSS_ULPS} float32 steps of a sequence's loss count as 0",
        "significant": changed, "significant_uncorrected": int((p <= alpha).sum()),
        "interval_excludes_0": excludes_0,
        "why": "Holm controls the family-wise error rate under any dependence between the tests (they share the "
               "sequences and the unmodified losses); the t-test's closed-form p-value has no resampling floor"})
    ResultStore.set_attrs(group["p_holm"], **method)
    return (f"{changed} of {tests} ablations change the loss (Holm-Bonferroni, α {alpha:g}; {excludes_0} intervals "
            "exclude 0 uncorrected)")


def plan_job(spec: Spec, ckpt: Checkpoint, ref: Checkpoint | None, layers: tuple[int, ...]) -> CausalJob:
    return CausalJob(plan_causal(ckpt, spec, layers), spec.resources.cpus_per_task)
