"""The dynamic analyses (paper §5, App D, App E) as layer-shard actors.

Planning (before the store is touched) tokenises every input, checks lengths, the tokenizer, the
reference and the family's decoder layers, and splits the layers into contiguous shards balanced by
bytes. Executing creates one actor per shard (`distributed.pipeline`); each materialises its layers
on CPU (embeddings on the first), runs every input's hidden states through them with the forced
all-expert capture (`runtime.LayerRange`), writes its own MoE layers' slabs of `dynamic/<input>/*`
and marks them done; hidden states flow on to the next shard as object refs.

An input is the unit of resumption: one that is not complete is computed again through every layer,
its done flags cleared first, so all of its layers come from one pass (one split, device and dtype).
When a shard's node is lost and the cluster does not hold the shard again within `node_wait_s`, the
unfinished inputs are re-planned over the nodes left (the same shards packed onto fewer nodes, or
fewer shards when they run on CPUs, whose memory Ray accounts), with a warning, or the job fails with
one line naming the shard, the node and what the cluster lacks.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..analysis.dynamic import angular_mean
from ..checkpoint import Checkpoint, ModelFacts, open_checkpoint
from ..data import corpus_sequences, input_text
from ..distributed.fanout import Unit
from ..distributed.pipeline import READY_TIMEOUT_S, PlacementTimeout, ShardLost, balance_layers, run_pipeline, say
from ..distributed.placement import Demand, Resources, refusal
from ..errors import CheckpointError, MoeRayError, SpecError
from ..fs import set_storage_options
from ..progress import ShardCounters
from ..runtime import LayerCapture, LayerRange, check_sequence, layer_keys
from ..spec import DynamicOptions, Spec
from ..store import DONE, DYNAMIC_SCHEMA, WEIGHTS, ResultStore, unit_done
from .job import AnalysisJob, WeightsRecord

GROUP = "dynamic"
UNIT_DIMS = ("layer",)
ACTIVATION_SLACK = 512 * 2**20
REPLAN_PLACE_S = 30
"""How long a re-planned pass waits to be placed before the next, more compact plan is tried."""
CORPUS = "corpus"
"""The input whose sequences are stored one group each, `dynamic/corpus/<n>`, with their token-weighted
aggregates (D2 angular mean, D3 rank counts) in `dynamic/corpus` itself."""


@dataclass(frozen=True)
class TokenizedInput:
    name: str
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    sha256: str


@dataclass(frozen=True)
class DynamicPlan:
    """Everything a shard actor needs, small and picklable."""

    model: str
    reference: str | None
    store: str
    facts: ModelFacts
    layers: tuple[int, ...]  # the MoE layers captured
    labels: tuple[str, ...]
    neuron_dim: int
    shards: tuple[tuple[int, int], ...]
    shard_weight_bytes: tuple[int, ...]  # float32 bytes of each shard's layers (+ reference FFNs)
    largest_layer_bytes: int  # float32: what a shard holds in flight while loading
    activation_bytes: int  # host memory of one input's activations and captures
    inputs: tuple[TokenizedInput, ...]
    options: DynamicOptions
    layer_bytes: tuple[int, ...] = ()  # float32 bytes of every decoder layer (embeddings on layer 0)
    reference_layer_bytes: int = 0  # float32 bytes of the reference FFN of each captured layer
    storage_options: dict = dataclasses.field(default_factory=dict, hash=False)
    """The spec's fsspec options: a shard actor opens the model and the store with them (`moe_ray.fs`)."""

    def resharded(self, shards: int, placement: str) -> "DynamicPlan":
        """This plan split into `shards` shards (balanced by bytes) placed with `placement`."""
        ranges = tuple(balance_layers(self.layer_bytes, shards))
        weights = tuple(sum(self.layer_bytes[a:b]) + self.reference_layer_bytes * sum(1 for l in self.layers if a <= l < b)
                        for a, b in ranges)
        options = dataclasses.replace(self.options, shards=shards, placement=placement)
        return dataclasses.replace(self, shards=ranges, shard_weight_bytes=weights, options=options)

    def device_for(self, gpus: float | None) -> str:
        """The device shards are placed for on a cluster with `gpus` GPUs (None: not known): `auto`
        is a GPU per shard when there are that many, else the CPU."""
        if self.options.device == "auto":
            return "cuda" if (gpus or 0) >= len(self.shards) else "cpu"
        return self.options.device

    def dtype_for(self, device: str) -> torch.dtype:
        """`auto`: bfloat16 on GPU, float32 on CPU."""
        name = self.options.dtype if self.options.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        return getattr(torch, name)

    def bundles(self, cpus: int, gpus: float | None) -> list[dict[str, float]]:
        """One placement-group bundle per shard: a GPU each on cuda (host memory: one layer in
        flight plus activations), else host memory for the weights in their dtype too."""
        device = self.device_for(gpus)
        scale = torch.empty((), dtype=self.dtype_for(device)).element_size() / 4
        transient = self.largest_layer_bytes + self.activation_bytes
        if device == "cuda":
            return [{"CPU": cpus, "GPU": 1, "memory": transient} for _ in self.shards]
        return [{"CPU": cpus, "memory": int(w * scale) + transient} for w in self.shard_weight_bytes]


def _cluster_gpus() -> float | None:
    """GPUs in the connected Ray cluster; None when not connected (planning offline)."""
    import ray

    return ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else None


def tokenize(ckpt: Checkpoint, names: list[str], options: DynamicOptions) -> tuple[TokenizedInput, ...]:
    """Each named input as token ids with the checkpoint's own tokenizer (BOS where it adds one)."""
    from ..checkpoint.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ckpt.location)
    texts: list[tuple[str, str]] = []
    for name in names:
        if name == CORPUS:
            sequences = corpus_sequences(options.corpus_file, options.max_sequences)
            width = len(str(len(sequences) - 1))
            texts += [(f"{CORPUS}/{k:0{width}d}", text) for k, text in enumerate(sequences)]
        else:
            texts.append((name, input_text(name, options.text_file)))
    out = []
    for name, text in texts:
        ids = tokenizer(text)["input_ids"]
        if options.max_tokens is not None:
            ids = ids[: options.max_tokens]
        check_sequence(torch.tensor(ids, dtype=torch.long), ckpt.config)
        out.append(TokenizedInput(name, tuple(ids), tuple(tokenizer.convert_ids_to_tokens(ids)),
                                  hashlib.sha256(text.encode()).hexdigest()))
    return tuple(out)


def _fp32_bytes(ckpt: Checkpoint, keys: list[str]) -> int:
    return sum(int(np.prod(ckpt.info(k).shape)) * 4 for k in keys)


def plan_dynamic(ckpt: Checkpoint, ref: Checkpoint | None, spec: Spec, layers: tuple[int, ...]) -> DynamicPlan:
    """Validate everything a dynamic run needs before any work starts."""
    facts, family = ckpt.facts, ckpt.family
    options = dataclasses.replace(spec.dynamic, device=spec.device_of("dynamic"))
    if family.decoder_classes() is None:
        raise CheckpointError(f"dynamic analyses do not support the {facts.family} family yet")
    inputs = tokenize(ckpt, list(dict.fromkeys(options.inputs)), options)
    n = facts.num_layers
    for layer in range(n):
        if not layer_keys(ckpt, layer):
            raise CheckpointError(f"layer {layer} has no tensors in {ckpt.location}")
    ckpt.require([family.embed_key()], "the embeddings")
    labels = [str(e) for e in range(facts.num_experts)]
    neuron_dim = facts.d_mid
    ref_bytes = 0
    if ref is not None:
        if ref.facts.d_hid != facts.d_hid or ref.facts.num_layers < max(layers) + 1 or ref.facts.moe_layers:
            raise CheckpointError(f"reference {ref.location} is not a dense model with this model's hidden "
                                  "size and layers: shapes don't match")
        for layer in layers:
            ref.require(list(ref.family.dense_ffn_keys(layer).values()), f"reference layer {layer}")
        ref_d_mid = ref.info(ref.family.dense_ffn_keys(layers[0])["up"]).shape[0]
        labels.append("F")
        neuron_dim = max(neuron_dim, ref_d_mid)
        ref_bytes = 3 * ref_d_mid * facts.d_hid * 4
    if facts.shared_d_mid and family.shared_key:
        labels.append("SE")
        neuron_dim = max(neuron_dim, facts.shared_d_mid)
    sizes = [_fp32_bytes(ckpt, layer_keys(ckpt, l)) for l in range(n)]
    sizes[0] += _fp32_bytes(ckpt, [family.embed_key()])
    balance_layers(sizes, options.shards)  # refuses more shards than layers
    longest = max(len(i.ids) for i in inputs)
    act_bytes = longest * len(labels) * (facts.d_hid * 3 + len(labels)) * 8 + ACTIVATION_SLACK
    unsplit = DynamicPlan(ckpt.location, ref.location if ref else None, spec.store, facts, tuple(layers),
                          tuple(labels), neuron_dim, (), (), max(sizes), act_bytes, inputs, options,
                          tuple(sizes), ref_bytes, storage_options=dict(spec.storage_options or {}))
    return unsplit.resharded(options.shards, options.placement)


def group_params(plan: DynamicPlan, item: TokenizedInput) -> dict:
    """What one input's results depend on (a rerun with other values is refused)."""
    return {"labels": list(plan.labels), "text_sha256": item.sha256, "tokens": len(item.ids),
            "intermediate_tokens": plan.options.intermediate_tokens,
            "save_expert_outputs": plan.options.save_expert_outputs,
            "dtype": plan.options.dtype}  # bfloat16 and float32 layers must not mix in one input


def prepare(store: ResultStore, plan: DynamicPlan, overwrite: bool = False) -> list[str]:
    """Create every input's group, coordinates and arrays; return the inputs not yet complete."""
    pending = []
    sequences = [i for i in plan.inputs if i.name.startswith(f"{CORPUS}/")]
    if sequences:  # the corpus as a whole: another corpus in the same store is refused (or replaced)
        digest = hashlib.sha256("".join(i.sha256 for i in sequences).encode()).hexdigest()
        store.group(f"{GROUP}/{CORPUS}", {"sequences": len(sequences), "corpus_sha256": digest,
                                          "labels": list(plan.labels)}, overwrite=overwrite)
    for item in plan.inputs:
        group = store.group(f"{GROUP}/{item.name}", group_params(plan, item), overwrite=overwrite)
        T, P = len(item.ids), min(plan.options.intermediate_tokens, len(item.ids))
        store.coord(group, "layer", np.array(plan.layers, dtype=np.int64))
        store.coord(group, "token", np.arange(T, dtype=np.int64))
        for dim in ("expert", "expert_i", "expert_j"):
            store.coord(group, dim, np.array(plan.labels))
        store.coord(group, "k", np.arange(plan.facts.top_k, dtype=np.int64))
        store.coord(group, "norm_rank", np.arange(plan.facts.num_experts, dtype=np.int64))
        store.coord(group, "score_rank", np.arange(plan.facts.num_experts, dtype=np.int64))
        store.coord(group, "probe_token", np.arange(P, dtype=np.int64))
        store.coord(group, "neuron", np.arange(plan.neuron_dim, dtype=np.int64))
        if plan.options.save_expert_outputs:
            store.coord(group, "hidden", np.arange(plan.facts.d_hid, dtype=np.int64))
        for name, quantity in DYNAMIC_SCHEMA.items():
            if name in ("tokens", "token_ids"):
                continue
            if name == "expert_outputs" and not plan.options.save_expert_outputs:
                continue
            store.array(group, name, quantity, UNIT_DIMS)
        _write_tokens(group, item)
        store.done_array(group, UNIT_DIMS)
        if not unit_done(group).all():
            pending.append(item.name)
    return pending


def _write_tokens(group, item: TokenizedInput) -> None:
    for name, values in (("tokens", np.array(item.tokens, dtype=object)), ("token_ids", np.array(item.ids))):
        if name in group:
            continue
        q = DYNAMIC_SCHEMA[name]
        arr = group.create_array(name, shape=values.shape, dtype=str if q.dtype == "str" else q.dtype,
                                 dimension_names=list(q.dims), attributes={"description": q.description})
        arr[...] = values


def capture_arrays(plan: DynamicPlan, cap: LayerCapture) -> dict[str, np.ndarray]:
    """One layer's slabs of every stored quantity, from its capture."""
    E, L = plan.facts.num_experts, len(plan.labels)
    T = cap.router_logits.shape[0]
    routed_pad = np.full((T, L), np.nan, dtype=np.float32)
    logits, scores = routed_pad.copy(), routed_pad.copy()
    logits[:, :E] = cap.router_logits.numpy()
    scores[:, :E] = cap.gate_scores.numpy()
    cos = cap.similarity
    P = min(plan.options.intermediate_tokens, T)
    inter = np.full((P, L, plan.neuron_dim), np.nan, dtype=np.float32)
    for li, vec in enumerate(cap.intermediate):
        inter[:, li, : vec.shape[-1]] = vec.numpy()
    out = {
        "router_logits": logits, "gate_scores": scores,
        "topk_experts": cap.topk_experts.numpy().astype(np.int64),
        "topk_weights": cap.topk_weights.numpy().astype(np.float32),
        "expert_output_norms": cap.norms.numpy().astype(np.float32),
        "expert_output_similarity": cos.numpy().astype(np.float32),
        "expert_output_angular_mean": angular_mean(cos).numpy().astype(np.float32),
        "norm_score_rank_counts": cap.rank_counts.numpy().astype(np.int64),
        "activation_ratio": cap.activation_ratio.numpy().astype(np.float32),
        "intermediate_states": inter,
    }
    if plan.options.save_expert_outputs:
        out["expert_outputs"] = cap.outputs.cpu().numpy().astype(np.float32)
    return out


def shard_label(plan: DynamicPlan, shard: int) -> str:
    start, end = plan.shards[shard]
    return f"dynamic shard {shard} of {len(plan.shards)} (layers {start}-{end - 1})"


def layer_weights(ckpt: Checkpoint, ref: Checkpoint | None, captured: Sequence[int], layer: int) -> WeightsRecord:
    """The digests of what the dynamic unit of captured `layer` depends on, whatever the sharding: the
    decoder layers after the previous captured layer up to `layer` (from the embeddings for the first),
    and its reference FFN. A dynamic input is recomputed whole unless all its units are done
    (`start_over`), so the done units of an input together record every tensor its stored results
    came from."""
    record = WeightsRecord()
    before = [l for l in captured if l < layer]
    first = before[-1] + 1 if before else 0
    keys = [] if before else [ckpt.family.embed_key()]
    for decoder in range(first, layer + 1):
        keys += layer_keys(ckpt, decoder)
    record.add("model", ckpt, keys)
    if ref is not None:
        record.add("reference", ref, list(ref.family.dense_ffn_keys(layer).values()))
    return record


class ShardWorker:
    """A Ray actor holding layers [start, end) of the model; `run` pushes one input through them.

    Its layers are loaded in the constructor, so a restarted actor (its process died) reloads them
    before its unfinished calls are retried. An error while loading (a checkpoint that went bad
    since planning) is kept and raised by `run`, so the job fails with that error at once instead
    of a restart that cannot help.
    """

    def __init__(self, plan: DynamicPlan, shard: int, device: str):
        set_storage_options(plan.storage_options)  # this actor opens URLs as the driver does
        self.plan = plan
        self.label = shard_label(plan, shard)
        self.load_error: Exception | None = None
        self.reference: Checkpoint | None = None
        self._weight_records: dict[int, str] = {}
        start, end = plan.shards[shard]
        try:
            if device == "cuda" and not torch.cuda.is_available():
                if plan.options.device == "cuda":
                    raise SpecError(f"{self.label} was given a GPU by Ray but torch sees no CUDA device")
                device = "cpu"  # `auto` on a cluster whose GPUs torch cannot use
            ref = open_checkpoint(plan.reference) if plan.reference else None
            self.runner = LayerRange(open_checkpoint(plan.model), start, end, ref, plan.layers, device,
                                     plan.dtype_for(device))
            self.reference = ref
            self.store = ResultStore(plan.store)  # (a store deleted mid-run: one line, not a restart loop)
        except Exception as exc:  # re-raised by run(), with its type, as the job's error
            self.load_error = exc

    def __repr__(self) -> str:  # names the shard in Ray's log prefixes and state API (repr_name)
        return self.label

    def _weights(self, layer: int) -> str:
        """`layer_weights` of a captured layer as stored JSON, computed once per actor."""
        if layer not in self._weight_records:
            self._weight_records[layer] = layer_weights(self.runner.ckpt, self.reference, self.plan.layers,
                                                        layer).json()
        return self._weight_records[layer]

    def run(self, name: str, value) -> torch.Tensor:
        """Token ids (first shard) or hidden states in; hidden states out; this shard's layers stored."""
        if self.load_error is not None:
            raise self.load_error
        hidden = self.runner.embed(torch.tensor(value, dtype=torch.long)) if self.runner.start == 0 else value
        hidden, captures = self.runner.forward(hidden, probe_tokens=self.plan.options.intermediate_tokens)
        group = self.store.root[f"{GROUP}/{name}"]
        for layer, cap in captures.items():
            li = self.plan.layers.index(layer)
            for key, values in capture_arrays(self.plan, cap).items():
                group[key][li] = values
            group[WEIGHTS][li] = self._weights(layer)
            group[DONE][li] = 1
        return hidden.cpu()  # the next shard may sit on another GPU or node


class DynamicJob(AnalysisJob):
    """The dynamic analyses of a run: one pipeline pass per input through the layer-shard actors."""

    name = "dynamic"

    def __init__(self, plan: DynamicPlan, cpus_per_shard: int = 1):
        self.plan = plan
        self.cpus = cpus_per_shard

    def units(self) -> list[Unit]:
        memory = max(b["memory"] for b in self.plan.bundles(self.cpus, _cluster_gpus()))
        return [Unit(f"dynamic {item.name}", (item.name,), memory) for item in self.plan.inputs]

    def demand(self, spec: Spec, nodes: Sequence[Resources] = ()) -> Demand:
        """The shards' placement group, for the device `auto` resolves to on these nodes."""
        return self._demand(self.plan, nodes)

    def _demand(self, plan: DynamicPlan, nodes: Sequence[Resources] = ()) -> Demand:
        gpus = sum(node.get("GPU", 0) for node in nodes) if nodes else _cluster_gpus()
        labels = [shard_label(plan, s) for s in range(len(plan.shards))]
        device = plan.device_for(gpus)
        return Demand(f"dynamic ({len(labels)} shards on {device}, {plan.options.placement})",
                      tuple(zip(labels, plan.bundles(self.cpus, gpus))), plan.options.placement)

    def prepare(self, store: ResultStore, overwrite: bool) -> list[Unit]:
        pending = set(prepare(store, self.plan, overwrite))
        return [u for u in self.units() if u.args[0] in pending]

    def execute(self, pending: list[Unit], spec: Spec) -> None:
        """Push every pending input through the shard actors (all inputs in flight at once); after a
        lost node, the unfinished ones again on a re-plan over the nodes left (or one clear error)."""
        store = ResultStore(self.plan.store)
        todo = {u.args[0] for u in pending}
        names = [i.name for i in self.plan.inputs if i.name in todo]
        plan, place_timeout = self.plan, READY_TIMEOUT_S
        lost, lost_plan, fallbacks, why = None, plan, [], []
        while names:
            start_over(store, names)
            try:
                return self._pass(plan, names, place_timeout, spec.progress)
            except ShardLost as exc:
                lost, lost_plan, why = exc, plan, []
                names = [n for n in names if not unit_done(store.root[f"{GROUP}/{n}"]).all()]
                if not names:
                    return None
                fallbacks = self._fallbacks(plan, exc.node_id)
            except PlacementTimeout as exc:
                if lost is None:
                    raise
                why.append(str(exc))
            plan = self._next_plan(lost, lost_plan, fallbacks, why, names)
            place_timeout = REPLAN_PLACE_S

    def _pass(self, plan: DynamicPlan, names: list[str], place_timeout: float, progress: bool = True) -> None:
        items = [(i.name, list(i.ids)) for i in plan.inputs if i.name in names]
        gpus = _cluster_gpus()
        device = plan.device_for(gpus)
        shards = range(len(plan.shards))
        labels = [shard_label(plan, s) for s in shards]
        counters = ShardCounters(labels, {name: len(ids) for name, ids in items}, "token", progress)
        try:
            run_pipeline(ShardWorker, [(plan, s, device) for s in shards], plan.bundles(self.cpus, gpus), items,
                         strategy=plan.options.placement, labels=labels, node_wait_s=plan.options.node_wait_s,
                         place_timeout_s=place_timeout, on_step=counters)
        finally:
            counters.close()

    def _fallbacks(self, plan: DynamicPlan, lost_node: str) -> list[tuple[DynamicPlan, str | None]]:
        """Plans for the nodes left (the lost one left out even while Ray still counts it alive), most
        like `plan` first, each with why those nodes cannot hold it (None: they may): the same shards
        packed (PACK), then, on CPUs, fewer shards, packed."""
        from ..distributed.cluster import alive_nodes

        nodes = alive_nodes(leaving_out=lost_node)
        gpus = sum(node.get("GPU", 0) for node in nodes)
        n = len(plan.shards)
        options = [plan.resharded(n, "PACK")] if plan.options.placement != "PACK" else []
        fewer = [plan.resharded(k, "PACK") for k in range(n - 1, 0, -1)]
        options += [p for p in fewer if p.device_for(gpus) == "cpu"]
        return [(p, refusal(self._demand(p, nodes), nodes)) for p in options]

    def _next_plan(self, lost: ShardLost, was: DynamicPlan, fallbacks: list[tuple[DynamicPlan, str | None]],
                   why: list[str], names: list[str]) -> DynamicPlan:
        """The next fallback the nodes left may hold, with a warning; none left: one line naming the
        shard, its node and what the cluster lacks, and the job fails."""
        inputs = f"{len(names)} unfinished input(s) ({', '.join(names)})"
        while fallbacks:
            plan, reason = fallbacks.pop(0)
            if reason is None:
                say(f"warning: {lost}: re-planned the {inputs} as {len(plan.shards)} shard(s) with "
                    f"{plan.options.placement} on the nodes left (was {len(was.shards)}, {was.options.placement})")
                return plan
            why.append(reason)
        reason = why[-1] if why else ("no other plan: a GPU's memory is not a Ray resource, so fewer, larger "
                                      "GPU shards are not tried")
        raise MoeRayError(f"{lost}, and the nodes left cannot hold the {inputs}: {reason}. Finished inputs "
                          "stay in the store: rerun the same spec to resume once the cluster has room")

    def finish(self, store: ResultStore) -> str:
        E = self.plan.facts.num_experts

        def mean_angular(group: str) -> float:
            """Mean of D2's off-diagonal routed-expert angular similarity in `dynamic/<group>`."""
            ang = np.asarray(store.root[f"{GROUP}/{group}/expert_output_angular_mean"][...], dtype=np.float64)
            return float(np.nanmean(ang[:, :E, :E][:, ~np.eye(E, dtype=bool)]))

        parts = []
        sequences = [i for i in self.plan.inputs if i.name.startswith(f"{CORPUS}/")]
        if sequences:
            tokens = write_corpus_aggregates(store, self.plan, sequences)
            parts.append(f"corpus ({len(sequences)} sequences, {tokens} tokens) mean angular similarity "
                         f"{mean_angular(CORPUS):.3f}")
        for item in self.plan.inputs:
            if item not in sequences:
                parts.append(f"{item.name} ({len(item.ids)} tokens) mean angular similarity "
                             f"{mean_angular(item.name):.3f}")
        return "dynamic: " + ", ".join(parts)


def start_over(store: ResultStore, names: Sequence[str]) -> None:
    """Clear the done flags of inputs about to be computed (again): a pass rewrites every layer of an
    input, so an input is never left with layers from two passes that may differ (another split,
    device or dtype)."""
    for name in names:
        flags = store.root[f"{GROUP}/{name}"][DONE]
        if np.asarray(flags[...]).any():
            flags[...] = 0


def write_corpus_aggregates(store: ResultStore, plan: DynamicPlan, sequences: list[TokenizedInput]) -> int:
    """`dynamic/corpus`: D2's angular mean over every token of every sequence (each sequence's mean
    weighted by its tokens) and D3's rank counts summed; returns the corpus's token count."""
    group = store.root[f"{GROUP}/{CORPUS}"]
    store.coord(group, "layer", np.array(plan.layers, dtype=np.int64))
    for dim in ("expert_i", "expert_j"):
        store.coord(group, dim, np.array(plan.labels))
    store.coord(group, "norm_rank", np.arange(plan.facts.num_experts, dtype=np.int64))
    store.coord(group, "score_rank", np.arange(plan.facts.num_experts, dtype=np.int64))
    tokens = sum(len(s.ids) for s in sequences)
    angular, counts = 0.0, 0
    for item in sequences:
        seq = store.root[f"{GROUP}/{item.name}"]
        angular = angular + np.asarray(seq["expert_output_angular_mean"][...], dtype=np.float64) * len(item.ids)
        counts = counts + np.asarray(seq["norm_score_rank_counts"][...])
    for name, values in (("expert_output_angular_mean", angular / tokens), ("norm_score_rank_counts", counts)):
        q = DYNAMIC_SCHEMA[name]
        arr = store.array(group, name, q, ("layer",), attrs={"sequences": len(sequences), "tokens": tokens})
        arr[...] = values.astype(q.dtype)
    group.attrs.update({"sequences": len(sequences), "tokens": tokens})
    return tokens


def plan_job(spec: Spec, ckpt: Checkpoint, ref: Checkpoint | None, layers: tuple[int, ...]) -> DynamicJob:
    return DynamicJob(plan_dynamic(ckpt, ref, spec, layers), spec.resources.cpus_per_task)
