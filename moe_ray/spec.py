"""The job spec: everything a run needs, as a dataclass with a default for every field.

A spec comes from a TOML file, a dict, keyword arguments or CLI flags; all four map onto the same
fields (every CLI flag is a spec field: `--dbscan-eps 50` is `[static] dbscan_eps = 50`).

    model = "path/to/checkpoint"        # local directory or fsspec URL
    reference = "path/to/dense"         # optional dense reference ("F")
    analyses = ["static"]
    store = "results.zarr"
    [static]
    dbscan_eps = 50.0
    [resources]
    num_cpus = 2
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpecError

ANALYSES = ("static", "reorder", "dynamic", "causal")
"""Analysis groups a spec may name (each has a runner in `moe_ray.api`)."""
DEVICES = ("auto", "cuda", "cpu")
"""Where analyses compute: `auto` is cuda when the cluster has GPUs, else the CPU."""
SEED_LIMIT = 2**32
"""Seeds are 0 <= seed < 2**32: what NumPy and scikit-learn accept as a random state (a larger one
failed inside a task, after the store existed)."""


def check_seed(name: str, seed: int) -> None:
    """Refuse a seed outside 0 <= seed < SEED_LIMIT, naming the field or flag."""
    if not 0 <= seed < SEED_LIMIT:
        raise SpecError(f"{name} must be between 0 and {SEED_LIMIT - 1}, not {seed}")


@dataclass
class StaticOptions:
    dbscan_eps: float | None = field(default=None, metadata={
        "help": "mark matrix-PCA outliers with DBSCAN at this eps (the paper uses 50); off if unset"})
    dbscan_min_samples: int = field(default=5, metadata={"help": "DBSCAN min_samples"})
    neuron_pca_method: str = field(default="auto", metadata={
        "choices": ("auto", "covariance", "randomized"), "help": "neuron PCA: covariance (exact), randomized, or auto (covariance up to d_hid 128)"})
    seed: int = field(default=0, metadata={"help": "seed of the randomised neuron PCA"})

    def validate(self) -> None:
        if self.neuron_pca_method not in ("auto", "covariance", "randomized"):
            raise SpecError(f"neuron_pca_method must be auto, covariance or randomized, not {self.neuron_pca_method!r}")
        if self.dbscan_eps is not None and self.dbscan_eps <= 0:
            raise SpecError(f"dbscan_eps must be positive, not {self.dbscan_eps}")
        if self.dbscan_min_samples < 1:
            raise SpecError(f"dbscan_min_samples must be at least 1, not {self.dbscan_min_samples}")
        check_seed("seed", self.seed)


@dataclass
class ReorderOptions:
    reorder_mode: str = field(default="joint", metadata={
        "choices": ("joint", "separate", "both"), "help": "S4 neuron reordering: joint (one permutation per neuron over up, gate, down), "
                "separate (the paper: one per matrix) or both"})
    pairs: list[str] | None = field(default=None, metadata={
        "help": "expert pairs to reorder, comma-separated like 0-1,2-3 (default: every pair i<j)"})
    pairs_per_task: int | None = field(default=None, metadata={
        "help": "at most this many expert pairs of one layer per Ray task: a t x t tile of the pair "
                "triangle with t = isqrt(k), so a task reads at most 2t experts once; the store is "
                "chunked in the same tiles when it is created, and a resume keeps them (default: sized "
                "from n, d_hid and the device so that a task runs about a minute)"})

    def validate(self) -> None:
        if self.reorder_mode not in ("joint", "separate", "both"):
            raise SpecError(f"reorder_mode must be joint, separate or both, not {self.reorder_mode!r}")
        for text in self.pairs or []:
            parse_pair(text)
        if self.pairs_per_task is not None and self.pairs_per_task < 1:
            raise SpecError(f"pairs_per_task must be at least 1, not {self.pairs_per_task}")


def parse_pair(text: str) -> tuple[int, int]:
    """An expert pair "i-j" as (min, max); the two experts must differ."""
    parts = str(text).strip().split("-")
    try:
        i, j = (int(p) for p in parts)
    except ValueError:
        raise SpecError(f"an expert pair is written like 0-1, not {text!r}") from None
    if i < 0 or j < 0:
        raise SpecError(f"expert indices in pair {text!r} must be non-negative")
    if i == j:
        raise SpecError(f"pair {text!r} names one expert twice; a pair needs two experts")
    return min(i, j), max(i, j)


@dataclass
class DynamicOptions:
    inputs: list[str] = field(default_factory=lambda: ["short", "long"], metadata={
        "choices": ("short", "long", "text", "corpus"), "help": "dynamic inputs, comma-separated: short (the paper's prompt), long (~1,100 tokens), "
                "text (the --text-file), corpus (the --corpus-file's sequences)"})
    text_file: str | None = field(default=None, metadata={"help": "a UTF-8 text file, run as input 'text'"})
    corpus_file: str | None = field(default=None, metadata={
        "help": "many sequences, run as input 'corpus' and by the causal analyses: a .jsonl file (a "
                "\"text\" field per line) or one sequence per line (default: the corpus shipped with "
                "moe-ray, 38 short public-domain passages); each is stored as dynamic/corpus/<n>, their "
                "token-weighted aggregates in dynamic/corpus"})
    max_sequences: int | None = field(default=None, metadata={
        "help": "use the corpus's first N sequences (input 'corpus' and the causal analyses); unset: all"})
    shards: int = field(default=1, metadata={"help": "layer-shard actors the model is split over"})
    max_tokens: int | None = field(default=1100, metadata={
        "help": "keep the first N tokens of each input (the paper's long input is ~1,100); unset: all"})
    intermediate_tokens: int = field(default=4, metadata={
        "help": "store the full act(W_gate x) vectors of this many first tokens"})
    placement: str = field(default="PACK", metadata={
        "choices": ("PACK", "SPREAD", "STRICT_SPREAD"), "help": "placement group strategy of the shards: PACK, SPREAD or STRICT_SPREAD (one node each)"})
    save_expert_outputs: bool = field(default=False, metadata={
        "help": "also store every expert's raw output vectors (layer x token x expert x hidden)"})
    device: str | None = field(default=None, metadata={
        "flag": "dynamic-device", "choices": DEVICES,
        "help": "where the shard actors run, overriding the spec's device for them: cuda (one GPU per "
                "shard), cpu, or auto (cuda when the cluster has a GPU for every shard); unset: device"})
    dtype: str = field(default="auto", metadata={
        "choices": ("auto", "float32", "bfloat16", "float16"), "help": "weights and compute dtype: float32, bfloat16, float16, or auto (bfloat16 on GPU, "
                "float32 on CPU); captures are stored in float32 either way"})
    node_wait_s: float = field(default=120.0, metadata={
        "help": "when a shard's node is lost: seconds to wait for the cluster to hold the shard again "
                "(a node coming back, an autoscaler's replacement) before re-planning the unfinished "
                "inputs on the nodes left, or failing"})

    def validate(self, runs: bool = True, causal: bool = False) -> None:
        """Ranges always; with `runs` (dynamic is among the analyses) also which inputs need which
        file. A text or corpus file no analysis reads is refused: it would be silently ignored (the
        causal checks, `causal`, read the corpus; input 'corpus' without a file is the built-in one)."""
        if self.device is not None and self.device not in DEVICES:
            raise SpecError(f"dynamic.device must be auto, cuda or cpu, not {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SpecError(f"dynamic.dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if not self.inputs:
            raise SpecError("dynamic.inputs is empty; name short, long, text or corpus")
        bad = [i for i in self.inputs if i not in ("short", "long", "text", "corpus")]
        if bad:
            raise SpecError(f"unknown dynamic input {bad[0]!r}; choose short, long, text or corpus")
        for name, path, flag in (("text", self.text_file, "--text-file"), ("corpus", self.corpus_file, "--corpus-file")):
            if path is not None and not path.strip():
                raise SpecError(f"{flag} is empty; give a file or leave it out")
            if name == "corpus" and causal:
                continue  # the causal checks read the corpus (the built-in one without a file)
            if not runs:
                if path is not None:
                    readers = "dynamic or causal" if name == "corpus" else "dynamic"
                    raise SpecError(f"{flag} is given but the analyses do not include {readers}; add dynamic "
                                    f"to --analyses (and {name} to --inputs) or drop {flag}")
                continue
            if name == "text" and name in self.inputs and not path:
                raise SpecError(f"dynamic input '{name}' needs {flag} PATH")
            if path and name not in self.inputs:
                raise SpecError(f"{flag} is given but dynamic.inputs ({','.join(self.inputs)}) does not include "
                                f"'{name}'; add {name} to --inputs or drop {flag}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise SpecError(f"max_sequences must be at least 1, not {self.max_sequences}")
        if self.shards < 1:
            raise SpecError(f"shards must be at least 1, not {self.shards}")
        if self.placement not in ("PACK", "SPREAD", "STRICT_SPREAD"):
            raise SpecError(f"placement must be PACK, SPREAD or STRICT_SPREAD, not {self.placement!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SpecError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if self.intermediate_tokens < 0:
            raise SpecError(f"intermediate_tokens must be 0 or more, not {self.intermediate_tokens}")
        if not self.node_wait_s >= 0:
            raise SpecError(f"node_wait_s must be 0 or more seconds, not {self.node_wait_s}")


CAUSAL_CHECKS = ("norm_routing", "ablation", "agreement")
"""The causal checks (beyond the paper; `units.causal`): routing by expert output norm, expert ablation,
and the agreement of weight and output similarity."""


@dataclass
class CausalOptions:
    """The causal checks of the paper's claims, run on the corpus (`dynamic.corpus_file`, or the one
    moe-ray ships) through the same layer-shard actors as the dynamic analyses (`dynamic.shards`,
    `dynamic.device`, `dynamic.dtype`, `dynamic.max_tokens` and `dynamic.max_sequences` apply)."""

    checks: list[str] = field(default_factory=lambda: list(CAUSAL_CHECKS), metadata={
        "choices": CAUSAL_CHECKS, "help": "causal checks, comma-separated: norm_routing (route by expert output norm, one layer "
                "and all layers), ablation (each expert, and the shared expert, removed from routing), "
                "agreement (weight vs output similarity)"})
    bootstrap_resamples: int = field(default=1000, metadata={
        "help": "bootstrap resamples of the corpus's sequences for the intervals of every loss change"})
    bootstrap_seed: int = field(default=0, metadata={"help": "seed of the bootstrap resamples"})
    confidence: float = field(default=0.95, metadata={
        "help": "level of the bootstrap intervals (percentile intervals over sequences); 1 - confidence is also "
                "the family-wise error rate of the Holm-corrected count of ablations that change the loss"})
    batch_tokens: int = field(default=16384, metadata={
        "help": "interventions of one sequence pushed through the layers together: at most this many "
                "tokens (interventions x sequence length) in one batch"})

    def validate(self) -> None:
        if not self.checks:
            raise SpecError("causal.checks is empty; name norm_routing, ablation or agreement")
        bad = [c for c in self.checks if c not in CAUSAL_CHECKS]
        if bad:
            raise SpecError(f"unknown causal check {bad[0]!r}; choose {', '.join(CAUSAL_CHECKS)}")
        check_seed("bootstrap_seed", self.bootstrap_seed)
        if self.bootstrap_resamples < 1:
            raise SpecError(f"bootstrap_resamples must be at least 1, not {self.bootstrap_resamples}")
        if not 0 < self.confidence < 1:
            raise SpecError(f"confidence must be between 0 and 1 (e.g. 0.95), not {self.confidence}")
        if self.batch_tokens < 1:
            raise SpecError(f"batch_tokens must be at least 1, not {self.batch_tokens}")


@dataclass
class Resources:
    num_cpus: int | None = field(default=None, metadata={
        "help": "CPUs of a local Ray started by moe-ray (default: all); ignored when joining a cluster"})
    cpus_per_task: int = field(default=1, metadata={"help": "CPUs each analysis task asks Ray for"})
    memory_per_task_gb: float | None = field(default=None, metadata={
        "help": "memory each task asks Ray for, GiB (default: sized from the layer's tensors)"})
    gpus_per_task: float | None = field(default=None, metadata={
        "help": "GPUs each static or reorder task asks Ray for on cuda, at most 1 (a fraction lets tasks "
                "share a GPU); default: the task's GPU memory as a share of gpu_memory_gb when that is "
                "set, else 1"})
    gpu_memory_gb: float | None = field(default=None, metadata={
        "help": "memory of each GPU the tasks run on (the smallest one on a mixed cluster), GiB: tasks "
                "then ask for their GPU memory's share of a GPU, and one that no GPU could hold is "
                "refused before anything runs (default: unknown; each task checks its GPU when it starts)"})
    object_store_memory_gb: float = field(default=1.0, metadata={
        "help": "object store of a local Ray started by moe-ray, GiB"})
    entrypoint_num_cpus: float = field(default=0.5, metadata={
        "help": "CPUs the driver of a submitted job (moe-ray submit) asks Ray for"})
    entrypoint_memory_gb: float = field(default=1.0, metadata={
        "help": "memory the driver of a submitted job asks Ray for, GiB"})
    check_fit: bool = field(default=True, metadata={
        "help": "refuse, before it starts (at submission too), work that no node of the cluster as it "
                "is now could hold; turn off for clusters that add nodes on demand"})

    def validate(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise SpecError(f"num_cpus must be at least 1, not {self.num_cpus}: a local Ray that moe-ray "
                            "starts with no CPUs can never run a task (leave it out for all CPUs)")
        if self.cpus_per_task < 1:
            raise SpecError(f"cpus_per_task must be at least 1, not {self.cpus_per_task}")
        for name in ("memory_per_task_gb", "object_store_memory_gb"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise SpecError(f"{name} must be positive, not {value:g}")
        for name in ("entrypoint_num_cpus", "entrypoint_memory_gb"):
            if getattr(self, name) < 0:
                raise SpecError(f"{name} may not be negative, not {getattr(self, name):g}")
        if self.gpus_per_task is not None and not 0 < self.gpus_per_task <= 1:
            raise SpecError(f"gpus_per_task must be more than 0 and at most 1 (a task computes on one GPU), "
                            f"not {self.gpus_per_task:g}")
        if self.gpu_memory_gb is not None and self.gpu_memory_gb <= 0:
            raise SpecError(f"gpu_memory_gb must be positive, not {self.gpu_memory_gb:g}")


@dataclass
class Spec:
    model: str = field(default="", metadata={"help": "MoE checkpoint: directory or fsspec URL (config.json + safetensors)"})
    reference: str | None = field(default=None, metadata={"help": "dense reference checkpoint (the paper's F)"})
    analyses: list[str] = field(default_factory=lambda: ["static"], metadata={
        "choices": ANALYSES, "help": f"analyses to run, comma-separated: {', '.join(ANALYSES)}"})
    store: str = field(default="results.zarr", metadata={"help": "results store (Zarr v3): path or fsspec URL"})
    address: str | None = field(default=None, metadata={
        "help": "Ray cluster to run on (default: start or join a local Ray)"})
    layers: list[int] | None = field(default=None, metadata={
        "help": "model layer indices to analyse, comma-separated (default: every MoE layer)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace a store made from a different model/spec"})
    progress: bool = field(default=True, metadata={
        "help": "show progress: bars on a terminal, a line every 10% in a log or pipe (the result line "
                "and errors are printed either way)"})
    mtp: bool = field(default=False, metadata={
        "help": "also analyse the multi-token-prediction layers (DeepSeek-V3's layer 61: static and "
                "reorder; dynamic passes run the main stack only)"})
    allow_pickle: bool = field(default=False, metadata={
        "help": "also read pickle weights (pytorch_model*.bin, loaded with weights_only=True); "
                "off by default: pickle files can run code when loaded"})
    device: str = field(default="auto", metadata={
        "choices": DEVICES, "help": "where every analysis computes: auto (GPUs when the cluster has them), cuda, or cpu. On "
                "cuda static and reorder tasks ask Ray for a GPU (gpus_per_task) and dynamic shards one "
                "GPU each (dynamic.device overrides it for the shards)"})
    storage_options: dict[str, Any] | None = field(default=None, metadata={
        "help": "fsspec options for the model, reference and store URLs (s3://, gs://, hf://, ...) as a JSON "
                "object, or a TOML table: e.g. endpoint_url, key, secret, or one table per protocol "
                "({\"s3\": {...}, \"hf\": {...}}) (default: the filesystem's own credentials, AWS_* variables "
                "for s3://); secrets are never written to the store"})
    static: StaticOptions = field(default_factory=StaticOptions)
    reorder: ReorderOptions = field(default_factory=ReorderOptions)
    dynamic: DynamicOptions = field(default_factory=DynamicOptions)
    causal: CausalOptions = field(default_factory=CausalOptions)
    resources: Resources = field(default_factory=Resources)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Spec":
        return _build(cls, data, "")

    @classmethod
    def from_toml(cls, path: str | Path) -> "Spec":
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"spec file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"spec file {path} is not valid TOML: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Spec":
        return dataclasses.replace(self, **changes)

    def with_absolute_paths(self) -> "Spec":
        """This spec with every local path (model, reference, store, text and corpus files) absolute and
        `~` expanded: Ray workers, a job's driver and the head resolve relative paths from their own
        directories, so paths are fixed here, before anything is created. URLs are unchanged."""
        from .fs import absolute

        inputs = dataclasses.replace(self.dynamic, text_file=absolute(self.dynamic.text_file),
                                     corpus_file=absolute(self.dynamic.corpus_file))
        return self.replace(model=absolute(self.model), reference=absolute(self.reference),
                            store=absolute(self.store), dynamic=inputs)

    def recorded(self) -> dict[str, Any]:
        """The spec as a store records it: `to_dict` with the values of secret storage options (keys,
        secrets, tokens, passwords) replaced by `<redacted>`."""
        data = self.to_dict()
        if data.get("storage_options"):
            data["storage_options"] = _redacted(data["storage_options"])
        return data

    def device_of(self, analysis: str) -> str:
        """The device setting (auto, cuda, cpu) `analysis` runs with: `device`, or for the dynamic
        shards `dynamic.device` where a spec sets it (older specs set only that)."""
        if analysis == "dynamic" and self.dynamic.device is not None:
            return self.dynamic.device
        return self.device

    def validate(self) -> None:
        """Checks that need no checkpoint: fields present, values in range, no flag that the
        analyses would silently ignore."""
        if not self.model.strip():
            raise SpecError("no model given (--model DIR or `model = ...` in the spec)")
        if self.reference is not None and not self.reference.strip():
            raise SpecError("reference is empty; give a dense checkpoint or leave it out")
        if not self.analyses:
            raise SpecError("no analyses given")
        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown:
            raise SpecError(f"unknown analysis {unknown[0]!r}; choose from {', '.join(ANALYSES)}")
        if not self.store.strip():
            raise SpecError("no store given (--store PATH)")
        if self.address is not None and not self.address.strip():
            raise SpecError("address is empty; give a Ray address or leave it out for a local Ray")
        negative = [l for l in self.layers or [] if l < 0]
        if negative:
            raise SpecError(f"layer {negative[0]} is negative; layers are the model's layer indices 0, 1, ...")
        if self.device not in DEVICES:
            raise SpecError(f"device must be auto, cuda or cpu, not {self.device!r}")
        from . import fs

        for what, location in (("model", self.model), ("reference", self.reference), ("store", self.store)):
            if location is not None:
                fs.check_location(location, what, in_process=True)
        self.resources.validate()
        self.static.validate()
        self.reorder.validate()
        if self.reorder.pairs and "reorder" not in self.analyses:
            raise SpecError("--pairs is given but the analyses do not include reorder; add reorder to "
                            "--analyses or drop --pairs")
        self._refuse_ignored()
        self.dynamic.validate(runs="dynamic" in self.analyses, causal="causal" in self.analyses)
        if "causal" in self.analyses:
            self.causal.validate()

    def _refuse_ignored(self) -> None:
        """Flags the analyses would silently ignore: causal options without causal, a reference that
        none of the analyses reads (reorder compares the model's experts only)."""
        if "causal" not in self.analyses:
            default = CausalOptions()
            changed = next((f.name for f in dataclasses.fields(CausalOptions)
                            if getattr(self.causal, f.name) != getattr(default, f.name)), None)
            if changed is not None:
                flag = "--" + changed.replace("_", "-")
                raise SpecError(f"{flag} (causal.{changed}) is given but the analyses do not include causal; "
                                f"add causal to --analyses or drop {flag}")
        if self.reference is not None and not {"static", "dynamic", "causal"} & set(self.analyses):
            raise SpecError(f"--reference is given but the analyses ({','.join(self.analyses)}) do not read a "
                            "reference (static, dynamic and causal do; reorder compares the model's own experts): "
                            "drop --reference or add an analysis that uses it")


SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas", "signature")
"""A storage option whose name contains one of these is a secret (`Spec.recorded` hides its value)."""


def _redacted(options: Any) -> Any:
    if isinstance(options, dict):
        return {k: "<redacted>" if any(w in str(k).lower() for w in SECRET_WORDS) else _redacted(v)
                for k, v in options.items()}
    return options


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise SpecError(f"spec section {where or 'root'} must be a table, not {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SpecError(f"unknown spec field '{where}{unknown[0]}'; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    return cls(**kwargs)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check a value against a field's type: a string only for a string field, a whole number for an
    integer, a finite number for a float (an integer is fine), true/false for a flag. Strings from
    the command line are parsed (`--layers 1,3`, `--dbscan-eps 50`, `--progress false`)."""
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise SpecError(f"spec field {name} may not be empty")
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    target = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    origin = typing.get_origin(target)
    if origin is list:
        (item,) = typing.get_args(target)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise SpecError(f"spec field {name} must be a list, not {_type_name(value)} {value!r}")
        if not value:
            raise SpecError(f"spec field {name} is an empty list; leave it out for the default")
        return [_coerce(v, item, name) for v in value]

    def wrong(what: str = "") -> SpecError:
        return SpecError(f"spec field {name} must be {what or target.__name__}, not "
                         f"{_type_name(value)} {value!r}")

    if origin is dict:
        if isinstance(value, str):  # from the command line: a JSON object
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise SpecError(f"spec field {name} must be a JSON object (a TOML table in a spec file), "
                                f"not {value!r}: {exc.msg}") from None
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise SpecError(f"spec field {name} must be a table of options, not {_type_name(value)} {value!r}")
        return value

    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise wrong("true or false")
    if target is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    if isinstance(value, bool):
        raise wrong()
    if target is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise wrong() from None
        raise wrong()
    if target is float:
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise wrong() from None
        else:
            raise wrong()
        if not math.isfinite(number):
            raise wrong("a finite number")
        return number
    return value


def _type_name(value: Any) -> str:
    return {str: "string", bool: "boolean", int: "integer", float: "number", list: "list",
            dict: "table"}.get(type(value), type(value).__name__)


def spec_fields(cls: type = Spec, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """Every leaf field as (dotted path, type hint, field): the CLI builds one flag per entry."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.extend(spec_fields(hint, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", hint, f))
    return out


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value
