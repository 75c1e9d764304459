"""`make-tiny`: small checkpoints in the real hub layout, with planted truths for tests and the demo.

Variants (deterministic by seed):
- `scratch`: every expert drawn independently (the paper's "trained from scratch" extreme);
- `upcycled`: every expert = one dense parent FFN + noise of relative size `sigma`; the parent is
  written too, as a dense reference checkpoint in `OUT/dense-parent/` (the paper's Mistral "F");
- `permuted`: odd experts are exact neuron permutations of the even expert before them (the same
  permutation of up rows, gate rows and down columns, so the function is unchanged; for quantised
  families the permutation moves whole quantisation blocks and permutes within them, so it stays
  exact in the stored format).

Each family is written in its real on-disk layout and dtype (`Family.stored_layout`): per-expert or
fused 3-D expert tensors, FP8 E4M3 with block scales (DeepSeek-V3), MXFP4 blocks and scales (gpt-oss),
so tests and demos go through the same reading code as real checkpoints.

Every checkpoint gets a small byte-level BPE tokenizer trained with `tokenizers` on the package's
long input text (`tokenizer.json` + `tokenizer_config.json`, loadable by transformers'
AutoTokenizer, BOS prepended like Mistral's). What was planted is written to `OUT/moe_ray_tiny.json`. Shards are small so that the
`model.safetensors.index.json` path is exercised like a real hub checkpoint.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import MoeRayError
from ..outdir import TINY_OUTPUT, claim_output_dir
from ..spec import SEED_LIMIT
from .families import Family, get_family
from .families.dense import Dense
from .quant import encode, fp8_block_size

VARIANTS = ("scratch", "upcycled", "permuted")
PLANTED_NAME = "moe_ray_tiny.json"
REFERENCE_DIR = "dense-parent"
WEIGHT_STD = 0.02
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class TinyCheckpoint:
    path: Path
    reference: Path | None
    planted: dict = field(default_factory=dict)


class _ShardWriter:
    """Writes tensors in order into shards of at most `shard_bytes`, then the index."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = out, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor]] = []
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        name = f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(self.out / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / tmp).rename(self.out / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _randn(shape: tuple[int, ...], gen: torch.Generator, std: float = WEIGHT_STD) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _plain_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator, random_biases: bool = False) -> torch.Tensor:
    """A non-expert tensor: norms are ones, biases zeros (small random where the family's biases are
    part of what is tested), matrices small random."""
    if len(shape) == 1 and ("norm" in key or key.endswith(".scale")):
        return torch.ones(shape)
    if key.endswith(".bias") and not random_biases:
        return torch.zeros(shape)
    return _randn(shape, gen)


def block_permutation(n: int, group: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation of n neurons that moves whole groups of `group` (a last partial group
    stays in place) and permutes within each group."""
    full = n // group
    order = torch.randperm(full, generator=gen) if full else torch.zeros(0, dtype=torch.long)
    starts = torch.cat([order * group, torch.tensor([full * group] if n % group else [], dtype=torch.long)])
    sizes = [group] * full + ([n % group] if n % group else [])
    return torch.cat([start + torch.randperm(size, generator=gen) for start, size in zip(starts.tolist(), sizes)])


def _expert_tensors(family: type[Family], config: dict, layer: int, variant: str, sigma: float,
                    gen: torch.Generator, planted: dict) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Expert matrices of one MoE layer (float, by matrix name; biases too where the family has
    them), and the dense parent FFN (upcycled only; else empty)."""
    facts = family.facts(config)
    d_mid, d_hid = facts.d_mid, facts.d_hid
    shapes = {"up": (d_mid, d_hid), "gate": (d_mid, d_hid), "down": (d_hid, d_mid)}
    if family.has_expert_biases:
        shapes.update({"up_bias": (d_mid,), "gate_bias": (d_mid,), "down_bias": (d_hid,)})
    matrices = ("up", "gate", "down")
    parent = {m: _randn(shapes[m], gen) for m in matrices} if variant == "upcycled" else {}
    experts: list[dict[str, torch.Tensor]] = []
    for e in range(facts.num_experts):
        if variant == "upcycled":
            mats = {m: parent[m] + sigma * _randn(shapes[m], gen) for m in matrices}
            mats.update({m: _randn(s, gen) for m, s in shapes.items() if m not in matrices})
            experts.append(mats)
        elif variant == "permuted" and e % 2 == 1:
            perm = block_permutation(d_mid, family.neuron_granularity(config), gen)
            src = experts[e - 1]
            mats = {"up": src["up"][perm], "gate": src["gate"][perm], "down": src["down"][:, perm]}
            if family.has_expert_biases:
                mats.update(up_bias=src["up_bias"][perm], gate_bias=src["gate_bias"][perm], down_bias=src["down_bias"])
            experts.append(mats)
            planted.setdefault(str(layer), {})[str(e)] = {"source": e - 1, "perm": perm.tolist()}
        else:
            experts.append({m: _randn(s, gen) for m, s in shapes.items()})
    parent_tensors = {}
    if parent:
        keys = Dense.dense_ffn_keys(layer)
        parent_tensors = {keys[m]: parent[m] for m in parent}
    return experts, parent_tensors


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

SHAPE_KEYS = ("num_hidden_layers", "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
              "n_shared_experts", "first_k_dense_replace", "moe_layer_freq")
"""What `--shape` takes from a real flavor: depth, expert counts, top-k and which layers are MoE; widths stay
the tiny ones, so a checkpoint with Mixtral 8x7B's 32 layers x 8 experts is a few MB."""


def shape_overrides(family: str, shape: str) -> dict:
    """Config overrides giving the tiny `family` model the depth and expert counts of a real flavor,
    `shape` = "FLAVOR" or "FAMILY:FLAVOR" (the flavors `moe-ray plan` knows, e.g. mixtral:8x7B)."""
    adapter = get_family(family)
    named, _, flavor = shape.rpartition(":")
    if named and named != family:
        raise MoeRayError(f"--shape {shape}: a {named} flavor for a {family} checkpoint; use {family}:FLAVOR")
    if flavor not in adapter.flavors:
        raise MoeRayError(f"unknown {family} flavor {flavor!r}; known: {', '.join(adapter.flavors) or 'none'}")
    config = adapter.text_config(adapter.flavors[flavor])
    return {k: config[k] for k in SHAPE_KEYS if k in config}


def make_tiny(family: str, variant: str, out: str | Path, seed: int = 0, sigma: float = 0.5,
              dtype: str = "bfloat16", shard_bytes: int = 256 * 1024, config_overrides: dict | None = None,
              overwrite: bool = False) -> TinyCheckpoint:
    """Build a tiny checkpoint of `family` in the hub layout under `out` (see module docstring)."""
    adapter = get_family(family)
    if variant not in VARIANTS:
        raise MoeRayError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if dtype not in DTYPES:
        raise MoeRayError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not (math.isfinite(sigma) and sigma >= 0):  # NaN noise made a checkpoint of NaN experts
        raise MoeRayError(f"--sigma must be a finite number, 0 or more, not {sigma}")
    if not 0 <= seed < SEED_LIMIT:
        raise MoeRayError(f"--seed must be between 0 and {SEED_LIMIT - 1}, not {seed}")
    config = adapter.tiny_config()
    for key, value in (config_overrides or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    config["torch_dtype"] = dtype
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["torch_dtype"] = dtype
    facts = adapter.facts(config)
    if not facts.moe_layers:
        raise MoeRayError(f"family {family!r} has no MoE layers; make-tiny builds MoE models "
                          "(dense references come with --variant upcycled)")
    output = claim_output_dir(out, TINY_OUTPUT, replace=overwrite)  # never touches files it did not write
    out = output.path

    gen = torch.Generator().manual_seed(seed)
    cast = DTYPES[dtype]
    planted: dict = {}
    writer = _ShardWriter(out, shard_bytes)
    parent_layers: dict[int, dict[str, torch.Tensor]] = {}
    shapes = adapter.tensor_shapes(config)
    expert_names = {layer: adapter.expert_tensor_names(layer, config)
                    for layer in facts.moe_layers + facts.mtp_layers}
    block = fp8_block_size(config.get("quantization_config"))

    def write(key: str, tensor: torch.Tensor) -> None:  # in the family's on-disk format
        for name, stored in encode(key, tensor, adapter.storage(key, config), cast, block).items():
            writer.add(name, stored)

    plain_cache: dict[str, torch.Tensor] = {}
    written_layers = set()
    for key, shape in shapes.items():
        match = _LAYER.search(key)
        layer = int(match.group(1)) if match else None
        if key in expert_names.get(layer, ()):
            if layer in written_layers:
                continue
            written_layers.add(layer)
            experts, parent = _expert_tensors(adapter, config, layer, variant, sigma, gen, planted)
            parent_layers[layer] = parent
            for k, t in adapter.fuse_experts(config, layer, experts).items():
                write(k, t)
        else:
            tensor = _plain_tensor(key, shape, gen, adapter.has_expert_biases)
            plain_cache[key] = tensor
            write(key, tensor)
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(out, int(adapter.text_config(config)["vocab_size"]))

    reference = None
    if variant == "upcycled":
        reference = out / REFERENCE_DIR
        _write_parent(adapter, config, reference, parent_layers, plain_cache, gen, cast, shard_bytes)
    info = {"family": family, "variant": variant, "seed": seed, "sigma": sigma, "dtype": dtype,
            "reference": REFERENCE_DIR if reference else None, "permuted": planted}
    (out / PLANTED_NAME).write_text(json.dumps(info))
    output.finish()
    return TinyCheckpoint(output.final, output.final_path(reference) if reference else None, info)


def _write_parent(adapter: type[Family], config: dict, out: Path, parent_layers: dict,
                  plain: dict[str, torch.Tensor], gen: torch.Generator, cast: torch.dtype,
                  shard_bytes: int) -> None:
    """The dense model the upcycled MoE came from: same attention and embeddings, expert-sized FFNs."""
    facts = adapter.facts(config)
    config = adapter.text_config(config)
    dense_config = Dense.tiny_config()
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "bos_token_id", "eos_token_id", "torch_dtype"):
        if k in config:
            dense_config[k] = config[k]
    dense_config["intermediate_size"] = facts.d_mid
    out.mkdir(parents=True)
    writer = _ShardWriter(out, shard_bytes)
    for key, shape in Dense.tensor_shapes(dense_config).items():
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else None
        parent = parent_layers.get(layer, {})
        tensor = parent.get(key)
        if tensor is None:
            tensor = plain[key] if key in plain and tuple(plain[key].shape) == shape else _plain_tensor(key, shape, gen)
        writer.add(key, tensor.to(cast))
    writer.close()
    (out / "config.json").write_text(json.dumps(dense_config, indent=2))


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
"""Ids 0, 1, 2: unk, BOS, EOS (the tiny configs' bos_token_id 1, eos_token_id 2)."""


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """Train a byte-level BPE tokenizer of `vocab_size` on the long input text and save it in the
    transformers layout (tokenizer.json + tokenizer_config.json) under `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data import LONG_FILE, SHORT_TEXT

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([LONG_FILE.read_text(encoding="utf-8"), SHORT_TEXT], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out))
