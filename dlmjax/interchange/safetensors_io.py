"""Reading and writing Hugging Face checkpoint folders, one tensor at a time.

A folder holds `config.json` and either `model.safetensors` or shards `model-0000x-of-0000y.safetensors` with
`model.safetensors.index.json` (`{"metadata": ..., "weight_map": {tensor: shard}}`).

The safetensors format is an 8-byte little-endian header length, a JSON header (`__metadata__` plus, per tensor,
`dtype`, `shape` and `data_offsets` into the data section) and the raw little-endian bytes. Reading parses the
header and maps the file (`mmap`): `HFCheckpoint.read(name)` is a read-only view of one tensor, so nothing is
loaded before it is used and a converter holds at most the tensor it is working on. bfloat16 and float8 tensors come
back as `ml_dtypes` arrays (numpy has no such dtypes), so every tensor keeps its exact bits.

Pages of a mapped file that have been read count in the process's resident memory until it lets them go: read
whole, a checkpoint would sit in memory next to the parameters made from it. `HFCheckpoint.release(array)` drops
the pages under a view (`MADV_DONTNEED`: they stay in the kernel's page cache, and a later read maps them again),
so an import holds the file's pages one tensor at a time (bench/convert_memory.py).

Writing (`write_safetensors`) streams tensors into a file laid out the way the safetensors library lays it out
(compact JSON header in the given tensor order, padded with spaces to 8 bytes), so an unchanged checkpoint is
written back with the same names, dtypes, bytes, metadata and order.
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from dlmjax.interchange.errors import InterchangeError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# safetensors dtype names -> numpy dtypes (bf16 / float8 from ml_dtypes).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype) -> str:
    """The safetensors name of a numpy dtype (raises InterchangeError for one safetensors cannot store)."""
    try:
        return DTYPE_NAMES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise InterchangeError(f"dtype {dtype} cannot be stored in safetensors; allowed: {sorted(DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    file: str  # file name inside the checkpoint folder
    begin: int  # byte offsets in the file's data section
    end: int


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    file: str
    metadata: dict | None  # the header's __metadata__ (None when absent)
    names: tuple[str, ...]  # tensors in data order


def read_header(path: str | Path) -> tuple[dict | None, list[TensorInfo], int]:
    """(metadata, tensors in data order, byte offset of the data section) of one .safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InterchangeError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise InterchangeError(f"{path}: not a safetensors file (header length {n} exceeds the file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InterchangeError(f"{path}: unreadable safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None)
    tensors = []
    for name, entry in header.items():
        dtype = entry.get("dtype")
        if dtype not in DTYPES:
            raise InterchangeError(f"{path}: tensor {name!r} has dtype {dtype!r}; supported: {sorted(DTYPES)}")
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
        if end - begin != DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64)) or end > size - 8 - n:
            raise InterchangeError(f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) has inconsistent "
                                   f"data offsets [{begin}, {end})")
        tensors.append(TensorInfo(name, dtype, shape, path.name, begin, end))
    tensors.sort(key=lambda t: t.begin)
    return metadata, tensors, 8 + n


class HFCheckpoint:
    """A Hugging Face checkpoint folder, opened lazily.

    Attributes:
      directory: the folder.
      config: the parsed config.json.
      tensors: name -> TensorInfo, in checkpoint order (shard by shard, data order within a shard).
      shards: ShardInfo per file, in file order.
      index: the parsed index JSON for a sharded checkpoint, else None.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"Hugging Face checkpoint folder {str(self.directory)!r} does not exist")
        config_path = self.directory / CONFIG_FILE
        if not config_path.is_file():
            raise InterchangeError(f"{self.directory} has no {CONFIG_FILE}; a Hugging Face checkpoint folder needs one")
        self.config = json.loads(config_path.read_text())
        self.index = None
        if (self.directory / INDEX_FILE).is_file():
            self.index = json.loads((self.directory / INDEX_FILE).read_text())
            weight_map = self.index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InterchangeError(f"{self.directory / INDEX_FILE} has no 'weight_map'")
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.directory.iterdir())
            raise InterchangeError(f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE} (found: {found}); "
                                   "only safetensors checkpoints are supported")
        self.tensors: dict[str, TensorInfo] = {}
        self.shards: list[ShardInfo] = []
        self._data_start: dict[str, int] = {}
        self._maps: dict[str, tuple[mmap.mmap, np.ndarray]] = {}  # file -> (mapping, uint8 view of all of it)
        for file in files:
            if not (self.directory / file).is_file():
                raise InterchangeError(f"{self.directory / INDEX_FILE} names shard {file!r}, which does not exist")
            metadata, infos, start = read_header(self.directory / file)
            self._data_start[file] = start
            for t in infos:
                if t.name in self.tensors:
                    raise InterchangeError(f"tensor {t.name!r} appears in both {self.tensors[t.name].file} and {file}")
                if weight_map is not None and weight_map.get(t.name) != file:
                    raise InterchangeError(f"tensor {t.name!r} is stored in {file} but {INDEX_FILE} maps it to "
                                           f"{weight_map.get(t.name)!r}")
                self.tensors[t.name] = t
            self.shards.append(ShardInfo(file, metadata, tuple(t.name for t in infos)))
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise InterchangeError(f"{INDEX_FILE} lists tensors that no shard holds: {missing[:5]}")

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> np.ndarray:
        """One tensor as a read-only array view of the mapped file (exact bits, its stored dtype)."""
        try:
            t = self.tensors[name]
        except KeyError:
            raise InterchangeError(f"tensor {name!r} is not in the checkpoint {self.directory}") from None
        if t.file not in self._maps:
            with open(self.directory / t.file, "rb") as f:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[t.file] = (mapping, np.frombuffer(mapping, np.uint8))
        start = self._data_start[t.file]
        raw = self._maps[t.file][1][start + t.begin:start + t.end]
        return raw.view(DTYPES[t.dtype]).reshape(t.shape)

    def release(self, array: np.ndarray | None = None) -> None:
        """Drop the mapped pages under `array` (a view from `read`, transposed or not; None: every mapped page)
        from this process's resident memory. The views stay valid: reading them again maps the pages back in.
        Anything that is not a view of this checkpoint is ignored."""
        advice, page = getattr(mmap, "MADV_DONTNEED", None), mmap.PAGESIZE
        if advice is None:  # no madvise on this platform: the pages go when the mapping does (`close`)
            return
        for mapping, whole in self._maps.values():
            base, size = whole.ctypes.data, whole.size
            if array is None:
                low, high = base, base + size
            else:
                low, high = np.lib.array_utils.byte_bounds(array)
                if not base <= low < base + size:
                    continue
            start = (low - base) // page * page
            end = min(size, -(-(high - base) // page) * page)
            if end > start:
                mapping.madvise(advice, start, end - start)

    def close(self):
        self._maps.clear()  # each mapping closes when the last view of it is gone


TensorSpec = tuple[str, str, tuple[int, ...]]  # (name, safetensors dtype, shape)


def safetensors_header(specs: Sequence[TensorSpec], metadata: dict | None) -> bytes:
    """The 8-byte length plus the JSON header (space-padded to 8 bytes) for tensors laid out in `specs` order."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in specs:
        nbytes = DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str | Path, specs: Sequence[TensorSpec], get: Callable[[str], np.ndarray],
                      metadata: dict | None = None) -> None:
    """Write one .safetensors file, streaming: `get(name)` is called once per tensor, in `specs` order.

    Each array must already have the spec's dtype and shape (raises InterchangeError otherwise). Written to a
    temporary name and renamed, so a failed export leaves no half-written shard under the final name.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(safetensors_header(specs, metadata))
        for name, dtype, shape in specs:
            a = np.asarray(get(name))
            if a.dtype != DTYPES[dtype] or tuple(a.shape) != tuple(shape):
                raise InterchangeError(f"tensor {name!r}: got {a.dtype} {list(a.shape)}, expected "
                                       f"{DTYPES[dtype]} ({dtype}) {list(shape)}")
            a = np.ascontiguousarray(a)
            f.write(a.reshape(-1).view(np.uint8).data if a.size else b"")
    tmp.replace(path)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file, in data order, as read-only views of the mapped file."""
    _, infos, start = read_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    return {t.name: raw[start + t.begin:start + t.end].view(DTYPES[t.dtype]).reshape(t.shape) for t in infos}
