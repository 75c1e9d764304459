"""Lazy, validated access to a checkpoint: config.json plus safetensors shards (local or fsspec).

Opening a checkpoint reads only config.json (through `config.parse_config`), the index and each
shard's header, and checks them: missing shards, truncated files, keys the index promises but a
shard lacks, header entries whose dtype, shape and byte range disagree, byte ranges outside the
file or overlapping. Which stored formats moe-ray can analyse is decided in one place,
`checkpoint.quant` (`analysable` asks it): float tensors, FP8 with its block scales, MXFP4 blocks and
scales. Tensors are read one at a time, on demand, and returned as float32 (or float64) whatever
their stored format: quantised tensors are dequantised exactly on the reader's device, and a piece of
a fused tensor (a `TensorRef`: one expert, one matrix) is read by slice, never the whole tensor.
`Checkpoint.fingerprint` identifies the weights' config and layout (not where they live) and
`Checkpoint.digests` their bytes (xxh3_128 of each stored tensor), so a store can refuse to resume
over other weights.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import fsspec
import torch
import xxhash
from safetensors import safe_open

from .. import fs as storage
from ..errors import CheckpointError, StorageError
from .config import model_facts, parse_config
from .families import Family, ModelFacts, detect_family
from .families.base import Key, TensorRef, ref_name
from .quant import DTYPE_BYTES, Stored, classify, dequantize_fp8_blocks, dequantize_mxfp4, logical_layout

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model.bin", ".bin", ".pt", ".pth", ".ckpt")
FINGERPRINT_VERSION = 2
DIGEST = "xxh3_128"
"""The content hash of stored tensor bytes: xxHash3 128-bit, non-cryptographic (it guards against
accidents, an edited or swapped file, not an adversary), at memory speed on one core."""
DIGEST_BLOCK = 64 << 20

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

def analysable(key: str, tensors: Mapping[str, "TensorInfo"], quantization_config: dict | None = None) -> str | None:
    """Whether moe-ray can analyse tensor `key` as stored: None if it can, else why not, a phrase naming
    its dtype that follows the tensor's name ("tensor K " + why). Decided by `checkpoint.quant.classify`,
    which sees every tensor of the checkpoint, so a quantised weight is accepted together with its
    companions (scales, blocks) and anything else is refused. Header validation
    (`Checkpoint.check_tensor`) and `Checkpoint.read` ask it (through `Checkpoint.storage`)."""
    stored = classify(key, tensors, quantization_config)
    return stored.refusal if stored is not None and stored.format == "refused" else None


SAFETENSORS_DTYPES = (*DTYPE_BYTES, "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64")
"""Every dtype name safetensors (0.8) parses; any other fails the whole file when a task opens it."""
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_values(tensor: torch.Tensor, what: str) -> None:
    """Refuse weights the analyses cannot compute on: NaN/Inf values, or finite values so large that
    the tensor's squared L2 norm overflows float32 (3e38 weights made NaN similarities in a store
    marked complete). The rule: sum(x^2) over the whole tensor, in float32, must be finite; then every
    norm, dot product and cosine the analyses take over it (or any part of it) is finite too. One dot
    product (a BLAS pass, no copy) decides both; only a refusal counts the values."""
    flat = tensor.reshape(-1)
    squares = torch.dot(flat, flat) if flat.dtype in (torch.float32, torch.float64) else \
        torch.dot(flat.float(), flat.float())
    if bool(torch.isfinite(squares)) and float(squares) <= FLOAT32_MAX:
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise CheckpointError(f"{what} has {bad} NaN/Inf values")
    raise CheckpointError(f"{what} holds values too large to analyse (largest |value| "
                          f"{float(tensor.abs().max()):.3g}): its squared norm overflows float32, so its "
                          "similarities would be NaN")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard, dtype, shape and byte range inside the shard's data."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _is_local(location: str) -> bool:
    return storage.is_local(location)


def _storage_failure(exc: BaseException, location: str, what: str) -> Exception:
    """An error met while reading `what` of the checkpoint at `location` as one line: a storage
    problem (credentials, bucket, permissions, a directory where a file should be) as a StorageError
    or CheckpointError naming the URL; anything else unchanged."""
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return CheckpointError(f"{what} in {location} is not a regular file")
    if isinstance(exc, RecursionError):
        return CheckpointError(f"{what} in {location} is nested too deeply to parse")
    why = storage.describe_error(exc, location)
    return StorageError(f"cannot read {what} of the checkpoint {location}: {why}") if why else exc


def require_regular_file(fs: fsspec.AbstractFileSystem, path: str, what: str) -> None:
    """Refuse, before it is opened, a checkpoint part that is not a regular file (or an object-store
    object): a named pipe blocks `open` until something writes to it (a `run` hung, SIGTERM did not
    end it), a device reads forever, a directory is not a file."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        import stat

        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise CheckpointError(f"cannot read {what}: {exc.strerror or exc}") from None
        kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else None if stat.S_ISREG(mode) else "not a regular file")
    else:
        try:
            kind = None if fs.info(path).get("type") == "file" else "not a file"
        except OSError as exc:
            raise CheckpointError(f"cannot read {what}: {exc}") from None
    if kind is not None:
        raise CheckpointError(f"{what} is {kind}, not a regular file; moe-ray reads checkpoint files only")


def _read_header(fs: fsspec.AbstractFileSystem, path: str, name: str) -> dict[str, TensorInfo]:
    """Parse one safetensors header and check it against the file: every entry's dtype, shape and
    byte range agree, every range lies inside the file, no two overlap, no bytes lie between them,
    the file is exactly as long as the header says, and `__metadata__` maps strings to strings: all
    that safetensors itself checks when a task opens the file, found here, before anything runs."""
    require_regular_file(fs, path, f"safetensors file {name}")
    try:
        with storage.storage_errors(path, CheckpointError, f"cannot read safetensors file {name}"):
            size = fs.size(path)
            # byte ranges, not fs.open: an object store's file reads ahead megabytes past the header
            head = storage.read_range(fs, path, 0, min(8, size))
            if len(head) < 8:
                raise CheckpointError(f"corrupted safetensors file {name}: {len(head)} bytes, no header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100_000_000):
                raise CheckpointError(f"corrupted safetensors file {name}: header length {header_len} "
                                      f"does not fit in a {size}-byte file")
            header = json.loads(storage.read_range(fs, path, 8, 8 + header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupted safetensors file {name}: unreadable header ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"corrupted safetensors file {name}: its header JSON is nested too deeply "
                              "to be a safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupted safetensors file {name}: its header is a JSON "
                              f"{type(header).__name__}, not an object of tensors")
    base = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in meta.items()):
                raise CheckpointError(f"corrupted safetensors file {name}: its __metadata__ is not an object of "
                                      "strings (safetensors refuses such a file)")
            continue
        infos[key] = _header_entry(path, name, key, meta, base, size)
    data_end, last = base, None
    for key, info in sorted(infos.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start < data_end and info.nbytes:
            raise CheckpointError(f"corrupted safetensors file {name}: tensors {last} and {key} overlap "
                                  "(their data_offsets share bytes)")
        if info.start > data_end:
            raise CheckpointError(f"corrupted safetensors file {name}: {info.start - data_end} bytes lie "
                                  f"between {'tensor ' + last if last else 'the header'} and tensor {key} "
                                  "(a hole in the data, which safetensors refuses)")
        if info.end > data_end:
            data_end, last = info.end, key
    if data_end != size:
        raise CheckpointError(
            f"truncated or corrupted safetensors file {name}: its header describes {data_end} "
            f"bytes, the file has {size}")
    return infos


def _header_entry(path: str, name: str, key: str, meta: object, base: int, size: int) -> TensorInfo:
    """One header entry as a TensorInfo, checked: dtype a string, shape a list of sizes, data_offsets
    [begin, end] inside the file and as long as dtype x shape needs."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"corrupted safetensors file {name}: tensor {key} {why}")

    def is_size(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(meta, dict):
        raise bad(f"has header entry {meta!r}, not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"has dtype {dtype!r}")
    if dtype not in SAFETENSORS_DTYPES:  # safetensors refuses the whole file: tensors moe-ray does not read too
        raise bad(f"has dtype {dtype!r}, which safetensors does not know (it knows {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(is_size(d) for d in shape):
        raise bad(f"has shape {shape!r}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_size(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise bad(f"has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    itemsize = DTYPE_BYTES.get(dtype)
    if itemsize is not None and end - begin != math.prod(shape) * itemsize:
        raise bad(f"is {dtype} of shape {shape} ({math.prod(shape) * itemsize} bytes), but its data_offsets "
                  f"span {end - begin} bytes")
    if base + end > size:
        raise CheckpointError(f"truncated or corrupted safetensors file {name}: tensor {key} ends at byte "
                              f"{base + end}, the file has {size}")
    return TensorInfo(path, dtype, tuple(shape), base + begin, base + end)


class Checkpoint:
    """A model checkpoint directory (or fsspec URL) holding config.json and safetensors shards."""

    def __init__(self, location: str | os.PathLike, allow_pickle: bool = False):
        self.location = str(location)
        self.allow_pickle = allow_pickle
        self.fs, self.root = storage.filesystem(self.location)
        try:
            found = self.fs.isdir(self.root)
        except Exception as exc:
            raise _storage_failure(exc, self.location, "the directory") from None
        if not found:
            raise CheckpointError(f"checkpoint directory not found: {self.location}")
        self.config = parse_config(self._read_config(), self.location)
        self.tensors = self._index()
        self.family: type[Family] = detect_family(self.config, self.tensors)
        self.facts: ModelFacts = model_facts(self.family, self.config, self.location)
        self.stored: dict[str, Stored] = logical_layout(self.tensors, self.config.get("quantization_config"))
        """Every logical tensor (scale and block companions folded in) and how it is stored."""
        self._handles: dict[str, object] = {}
        self._digested: dict[tuple[str, int, int], str] = {}
        """Digests of byte ranges fetched from remote storage, hashed as they arrived (`digests`)."""

    # ---- opening -------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _read_config(self) -> object:
        path = self._path("config.json")
        if not self.fs.exists(path):
            raise CheckpointError(f"no config.json in {self.location}")
        require_regular_file(self.fs, path, f"config.json in {self.location}")
        try:
            return json.loads(self._small_file(path, "config.json"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"config.json in {self.location} is not valid JSON: {exc}") from None
        except RecursionError:
            raise CheckpointError(f"config.json in {self.location} is nested too deeply to parse") from None

    def _small_file(self, path: str, name: str) -> bytes:
        """A small JSON file of the checkpoint (config.json, the index), whole: a regular file only
        (a directory or a named pipe in its place is refused, never waited on)."""
        try:
            if _is_local(self.location) and not os.path.isfile(path):
                raise IsADirectoryError(path)
            return storage.read_file(self.fs, path)
        except Exception as exc:
            raise _storage_failure(exc, self.location, name) from None

    def _index(self) -> dict[str, TensorInfo]:
        try:
            names = sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))
        except Exception as exc:
            raise _storage_failure(exc, self.location, "the file list") from None
        if INDEX_NAME in names:
            weight_map = self._weight_map()
            shards = sorted(set(weight_map.values()))
        else:
            shards = [SINGLE_NAME] if SINGLE_NAME in names else [n for n in names if n.endswith(".safetensors")]
            weight_map = None
        if not shards:
            pickles = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
            if pickles and self.allow_pickle:
                return self._index_pickles(pickles)
            if any(n.endswith(PICKLE_PATTERNS) for n in names):
                raise CheckpointError(
                    f"{self.location} holds only pickle weights (.bin/.pt); moe-ray reads safetensors only. "
                    "Convert the checkpoint to safetensors (pickle files can run code when loaded), or "
                    "pass --allow-pickle to load pytorch_model*.bin with torch.load(weights_only=True)")
            raise CheckpointError(f"no safetensors weights in {self.location}")
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            path = self._path(shard)
            if not self.fs.exists(path):
                where = f" (listed in {INDEX_NAME})" if weight_map else ""
                raise CheckpointError(f"missing shard {shard}{where} in {self.location}")
            for key, info in _read_header(self.fs, path, shard).items():
                if key in tensors:
                    raise CheckpointError(f"tensor {key} is in two shards of {self.location}: "
                                          f"{os.path.basename(tensors[key].file)} and {shard}")
                tensors[key] = info
        if weight_map is not None:
            for key, shard in weight_map.items():
                info = tensors.get(key)
                if info is None or os.path.basename(info.file) != shard:
                    raise CheckpointError(f"tensor {key} is listed in {INDEX_NAME} under {shard}, "
                                          f"but {shard} does not contain it")
        return tensors

    def _weight_map(self) -> dict[str, str]:
        """The index's weight_map (tensor -> shard file name), checked: an object of names, shard
        names plain file names in this directory."""
        require_regular_file(self.fs, self._path(INDEX_NAME), f"{INDEX_NAME} in {self.location}")
        try:
            index = json.loads(self._small_file(self._path(INDEX_NAME), INDEX_NAME))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{INDEX_NAME} in {self.location} is unreadable: {exc}") from None
        except RecursionError:
            raise CheckpointError(f"{INDEX_NAME} in {self.location} is nested too deeply to parse") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{INDEX_NAME} in {self.location} has no weight_map object of "
                                  "tensor names and shard files")
        for shard in weight_map.values():
            if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{INDEX_NAME} in {self.location} names shard {shard!r}, not a "
                                      "file of this directory")
        return weight_map

    def _index_pickles(self, files: list[str]) -> dict[str, TensorInfo]:
        """pytorch_model*.bin shards (only with allow_pickle): loaded with `weights_only=True`, which
        refuses arbitrary objects, and memory-mapped, so indexing reads no tensor data."""
        if not _is_local(self.location):
            raise CheckpointError(f"pickle weights are read only from a local directory, not {self.location}")
        tensors: dict[str, TensorInfo] = {}
        names = {v: k for k, v in DTYPES.items()}
        for name in files:
            path = self._path(name)
            for key, t in self._load_pickle(path).items():
                tensors[key] = TensorInfo(path, names.get(t.dtype, str(t.dtype)), tuple(t.shape), 0,
                                          t.numel() * t.element_size())
        return tensors

    def _load_pickle(self, path: str) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(f"cannot load pickle weights {os.path.basename(path)} safely: "
                                  f"{str(exc).strip().splitlines()[0]}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{os.path.basename(path)} is not a state dict of tensors")
        return state

    # ---- metadata ----------------------------------------------------------------------------
    def __contains__(self, key: Key) -> bool:
        return ref_name(key) in self.stored or ref_name(key) in self.tensors

    def storage(self, key: Key) -> Stored:
        """How a logical tensor is stored; a format moe-ray cannot read is refused here, with the
        tensor and its dtype named (`checkpoint.quant` is the one place that decides)."""
        name = ref_name(key)
        stored = self.stored.get(name)
        if stored is None:
            info = self.tensors.get(name)  # a companion (scales, blocks) asked for by its own name
            if info is None:
                raise CheckpointError(f"tensor {name} is missing from the checkpoint {self.location}")
            stored = classify(name, {name: info}) or Stored(name, "refused", info.shape, (name,), info.dtype)
        if stored.format == "refused":
            raise CheckpointError(f"tensor {name} {stored.refusal}")
        return stored

    def info(self, key: Key) -> TensorInfo:
        """Where a tensor (or a TensorRef's piece of one) lives: file, dtype, logical shape, and the
        byte range its stored bytes (the first part's, for quantised ones) occupy."""
        name = ref_name(key)
        stored = self.stored.get(name)
        physical = self.tensors.get(stored.parts[0] if stored else name)
        if physical is None:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint {self.location}")
        shape = stored.shape if stored else physical.shape
        if not isinstance(key, TensorRef):
            if stored is None or stored.format in ("float", "fp8_block", "refused"):
                return physical
            return TensorInfo(physical.file, stored.dtype, shape, physical.start, physical.end)
        start, end = physical.start, physical.end
        if key.index and isinstance(key.index[0], int) and physical.shape:
            row = (end - start) // physical.shape[0]
            start, end = start + key.index[0] * row, start + (key.index[0] + 1) * row
        dtype = stored.dtype if stored else physical.dtype
        return TensorInfo(physical.file, dtype, key.shape(tuple(shape)), start, end)

    def require(self, keys: list[Key], what: str = "") -> None:
        """Fail with one clear message if any of `keys` is missing or stored in a format moe-ray
        cannot read (checked before work starts)."""
        missing = [k for k in keys if k not in self]
        if missing:
            extra = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            for_what = f" needed for {what}" if what else ""
            raise CheckpointError(f"tensor {missing[0]}{extra}{for_what} is missing from the checkpoint "
                                  f"{self.location}")
        for key in keys:
            self.storage(key)

    def check_tensor(self, key: Key, shape: tuple[int, ...], what: str) -> str | None:
        """Why tensor `key` (or a TensorRef's piece of one) cannot serve as `what` with this shape
        (missing, a format `checkpoint.quant` refuses, another shape), as one line; None if it can.
        From the headers alone."""
        if key not in self:
            return f"tensor {key} ({what}) is missing from the checkpoint {self.location}"
        try:
            self.storage(key)
        except CheckpointError:
            return f"tensor {key} ({what}) {self.stored[ref_name(key)].refusal}"
        actual = self.info(key).shape
        if tuple(actual) != tuple(shape):
            return (f"tensor {key} ({what}) has shape {list(actual)}, config.json in {self.location} "
                    f"implies {list(shape)}")
        return None

    def nbytes(self, keys: list[str] | None = None) -> int:
        keys = self.tensors if keys is None else keys
        return sum(self.info(k).nbytes for k in keys)

    @cached_property
    def fingerprint(self) -> dict:
        """The cheap identity of these weights, wherever they live (a path spelled differently, a copy,
        a re-sharding are the same weights): config.json, and per unit (a decoder layer; `other` for
        embeddings, norm, head) a digest of its tensors' names, dtypes and shapes. It reads no tensor
        data: the content is identified exactly by `digests`, which every work unit records for the
        tensors it read and a resume checks (`store.ResultStore.check_weights`)."""
        units: dict[str, dict[str, str]] = {}
        for unit, keys in self.unit_keys.items():
            layout = json.dumps([[k, self.tensors[k].dtype, list(self.tensors[k].shape)] for k in keys])
            units[unit] = {"layout": hashlib.blake2b(layout.encode(), digest_size=8).hexdigest()}
        return {
            "fingerprint": FINGERPRINT_VERSION,
            "location": self.location,  # for messages only: not compared
            "config": self.config,
            "tensors": len(self.tensors),
            "bytes": self.nbytes(),
            "units": units,
        }

    @cached_property
    def unit_keys(self) -> dict[str, list[str]]:
        """Tensor keys by fingerprint unit, in order: `layer 0`, `layer 1`, ..., then `other`; keys
        sorted within a unit."""
        by_unit: dict[str, list[str]] = {}
        layer = re.compile(re.escape(self.family.key_prefix) + r"layers\.(\d+)\.")
        for key in sorted(self.tensors):
            m = layer.match(key)
            by_unit.setdefault(f"layer {int(m.group(1))}" if m else "other", []).append(key)
        return dict(sorted(by_unit.items(), key=lambda kv: (kv[0] == "other",
                                                            int(kv[0].split()[-1]) if kv[0] != "other" else 0)))

    def stored_pieces(self, key: Key) -> list[tuple[str, TensorInfo]]:
        """The stored byte ranges behind a logical tensor or a TensorRef's piece of one, named as
        `digests` names them: each physical part (a quantised tensor's scales and blocks too), as
        `name` or, for one leading-index row of a fused tensor, `name[i]` (other pieces: the part)."""
        name = ref_name(key)
        stored = self.stored.get(name)
        parts = stored.parts if stored is not None else (name,)
        row = key.index[0] if isinstance(key, TensorRef) and key.index and isinstance(key.index[0], int) else None
        out = []
        for part in parts:
            if row is None:
                out.append((part, self.tensors[part]))
            else:
                out.append((f"{part}[{row}]", self.info(TensorRef(part, (row,)))))
        return out

    def digests(self, keys: "Iterable[Key]") -> dict[str, str]:
        """The content hash (DIGEST, hex) of the stored bytes behind every key (`stored_pieces`), by
        piece name. A work unit records these for the tensors it read, right after reading them (the
        bytes are then in the page cache: hashing costs CPU at xxh3's speed, not a second read from
        disk), and a resume recomputes them for every done unit's tensors: any changed byte changes
        the hash, which mtime, size or sampled bytes cannot promise."""
        pieces: dict[str, TensorInfo] = {}
        for key in keys:
            pieces.update(self.stored_pieces(key))
        return {name: self._digest(name.split("[", 1)[0], info) for name, info in pieces.items()}

    def piece_digests(self, pieces: "Iterable[str]", threads: int = 8) -> dict[str, str | None]:
        """`digests` of pieces named as it names them (`name`, `name[i]`), read `threads` at a time
        (reads overlap; hashing runs at about 20 GB/s a core); None for a piece this checkpoint lacks."""
        from concurrent.futures import ThreadPoolExecutor

        def one(piece: str) -> str | None:
            name, _, row = piece.partition("[")
            if name not in self.tensors:
                return None
            info = self.tensors[name] if not row else self.info(TensorRef(name, (int(row.rstrip("]")),)))
            return self._digest(name, info, fresh=True)

        pieces = list(pieces)
        with ThreadPoolExecutor(max(1, min(threads, len(pieces)))) as pool:
            return dict(zip(pieces, pool.map(one, pieces)))

    def _digest(self, name: str, info: TensorInfo, fresh: bool = False) -> str:
        """The digest of one stored byte range: hashed as a remote read fetched it, unless `fresh`
        (a resume's check reads it anew); else read (a local file: from the page cache after a read)."""
        if not fresh and (info.file, info.start, info.end) in self._digested:
            return self._digested[(info.file, info.start, info.end)]
        h = xxhash.xxh3_128()
        if info.file.endswith(".bin"):
            state = self._handles.get(info.file)
            if state is None:
                state = self._handles[info.file] = self._load_pickle(info.file)
            raw = state[name].contiguous().reshape(-1).view(torch.uint8).numpy()
            h.update(memoryview(raw)[info.start:info.end])
            return h.hexdigest()
        try:
            if _is_local(self.location):
                fd = os.open(info.file, os.O_RDONLY)
                try:
                    for at in range(info.start, info.end, DIGEST_BLOCK):
                        block = os.pread(fd, min(DIGEST_BLOCK, info.end - at), at)
                        if not block:
                            raise OSError(f"{os.path.basename(info.file)} ends before byte {info.end}")
                        h.update(block)
                finally:
                    os.close(fd)
            else:
                for at in range(info.start, info.end, DIGEST_BLOCK):
                    h.update(self.fs.cat_file(info.file, start=at, end=min(at + DIGEST_BLOCK, info.end)))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read tensor {name} of {self.location}: {exc}") from None
        return h.hexdigest()

    # ---- reading -----------------------------------------------------------------------------
    def read(self, key: Key, dtype: torch.dtype = torch.float32, check_finite: bool = True,
             device: str | torch.device | None = None) -> torch.Tensor:
        """One tensor, or a TensorRef's piece of one, converted to `dtype` (float32 by default, whatever
        it is stored as) on `device` (the CPU by default). Stored bytes travel as stored and are
        converted there: quantised tensors are dequantised on `device` (`checkpoint.quant`), so no
        float copy is ever made on the host for a device read."""
        ref = key if isinstance(key, TensorRef) else TensorRef(key)
        stored = self.storage(ref.name)
        index = ref.torch_index(stored.shape)
        if stored.format == "float":
            tensor = self._load(stored.parts[0], index)
            if device is not None:
                tensor = tensor.to(device=device)
            tensor = tensor.to(dtype)
        elif stored.format == "fp8_block":
            tensor = self._dequantized(stored, index, 2, device, lambda w, s: dequantize_fp8_blocks(w, s, stored.block, dtype))
        else:  # mxfp4: the logical tensor is the stored one with its last two dims swapped
            full = index + (slice(None),) * (len(stored.shape) - len(index))
            swapped = full[:-2] + (full[-1], full[-2])
            tensor = self._dequantized(stored, swapped, 1, device, lambda b, s: dequantize_mxfp4(b, s, dtype))
            if not isinstance(full[-1], int) and not isinstance(full[-2], int):
                tensor = tensor.transpose(-1, -2)
        if ref.transpose:
            tensor = tensor.transpose(-1, -2)
        tensor = tensor.contiguous()
        if check_finite and tensor.is_floating_point():
            check_values(tensor, f"tensor {ref} in {self.location}")
        return tensor

    def _dequantized(self, stored: Stored, index: tuple, blocked: int, device, dequantize) -> torch.Tensor:
        """A quantised tensor's `[index]` in stored order: the index's dims before the `blocked`
        trailing dims select stored bytes (weights and scales alike), which go to `device` as stored
        and are dequantised there; the rest of the index applies to the dequantised values."""
        lead = index[: max(len(stored.shape) - blocked, 0)]
        parts = [self._load(p, lead) for p in stored.parts]
        if device is not None:
            parts = [p.to(device=device) for p in parts]
        tensor = dequantize(*parts)
        rest = index[len(lead):]
        if rest:
            kept = sum(1 for i in lead if not isinstance(i, int))
            tensor = tensor[(slice(None),) * kept + rest]
        return tensor

    def _load(self, key: str, index: tuple = ()) -> torch.Tensor:
        """A physical tensor, or `tensor[index]`, as stored, on the CPU: a local shard is sliced by
        safetensors (only the selected bytes are copied), a remote one fetches the byte range of its
        leading index."""
        info = self.tensors[key]
        if info.file.endswith(".bin"):
            state = self._handles.get(info.file)
            if state is None:
                state = self._handles[info.file] = self._load_pickle(info.file)
            tensor = state[key]
            return tensor[index] if index else tensor
        if _is_local(self.location):
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = safe_open(info.file, framework="pt")
            return handle.get_slice(key)[index] if index else handle.get_tensor(key)
        start, end, shape = info.start, info.end, info.shape
        if index and isinstance(index[0], int) and shape:
            row = (end - start) // shape[0]
            start, end, shape, index = start + index[0] * row, start + (index[0] + 1) * row, shape[1:], index[1:]
        try:
            raw = storage.read_range(self.fs, info.file, start, end)
        except Exception as exc:
            raise _storage_failure(exc, self.location, f"tensor {key}") from None
        self._digested[(info.file, start, end)] = xxhash.xxh3_128(raw).hexdigest()  # `digests` needs no refetch
        tensor = torch.frombuffer(bytearray(raw), dtype=DTYPES[info.dtype]).reshape(shape)
        return tensor[index] if index else tensor

    def prefetch(self, keys: list[Key]) -> None:
        """Ask the kernel to start reading these tensors' bytes now (POSIX_FADV_WILLNEED), so a unit
        that reads them one after another computes on the first while the rest arrive from disk.
        Local safetensors shards only; elsewhere (and where the OS lacks fadvise) a no-op."""
        if not _is_local(self.location) or not hasattr(os, "posix_fadvise"):
            return
        by_file: dict[str, list[TensorInfo]] = {}
        for key in keys:
            stored = self.stored.get(ref_name(key))
            parts = [key] if stored is None or len(stored.parts) == 1 else [
                TensorRef(p, key.index[:1]) if isinstance(key, TensorRef) else p for p in stored.parts]
            for part in parts:
                info = self.info(part)
                if info.file.endswith(".safetensors"):
                    by_file.setdefault(info.file, []).append(info)
        for file, infos in by_file.items():
            fd = os.open(file, os.O_RDONLY)
            try:
                for info in infos:
                    os.posix_fadvise(fd, info.start, info.nbytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Drop open shard handles (and their memory maps); later reads reopen them."""
        self._handles.clear()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


def open_checkpoint(location: str | os.PathLike, allow_pickle: bool = False) -> Checkpoint:
    return Checkpoint(location, allow_pickle)
