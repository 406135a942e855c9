"""Memory-mapped safetensors reading with bf16 support and truncation checks.

We parse the (simple, documented) safetensors header ourselves so that bf16 tensors come out as
`ml_dtypes.bfloat16` numpy arrays without torch, every tensor is a lazy view of the file (no
copy until it is used), and a truncated shard is reported by name instead of crashing later.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from earlytom_jax.errors import CheckpointError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """One .safetensors file: `keys()`, `shape(k)`, `dtype(k)`, and `get(k)` (a read-only view)."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 1 << 30:
                    raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
                header = json.loads(f.read(n))
        except CheckpointError:
            raise
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._entries = {}
        for name, info in header.items():
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
            begin, end = info["data_offsets"]
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{path}: truncated: tensor {name} ends at byte {self._data_start + end} "
                    f"but the file has {size}; download or copy the shard again"
                )
            self._entries[name] = (dtype, tuple(info["shape"]), begin, end)
        self._mm = None

    def keys(self):
        return self._entries.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str):
        return np.dtype(self._entries[key][0])

    def nbytes(self, key: str) -> int:
        _, _, begin, end = self._entries[key]
        return end - begin

    def get(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[key]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self._data_start + begin : self._data_start + end]
        return raw.view(dtype).reshape(shape)


def open_checkpoint_files(directory: str) -> dict[str, SafetensorsFile]:
    """Map every tensor name to the file holding it (single file or sharded with an index)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
        files: dict[str, SafetensorsFile] = {}
        out = {}
        for name, fname in weight_map.items():
            if fname not in files:
                path = os.path.join(directory, fname)
                if not os.path.isfile(path):
                    raise CheckpointError(f"{path}: shard named in the index is missing")
                files[fname] = SafetensorsFile(path)
            if name not in files[fname].keys():
                raise CheckpointError(f"{files[fname].path}: tensor {name} listed in the index is absent")
            out[name] = files[fname]
        return out
    if os.path.isfile(single):
        f = SafetensorsFile(single)
        return {name: f for name in f.keys()}
    found = sorted(x for x in os.listdir(directory) if x.endswith(".safetensors"))
    if found:
        out = {}
        for fname in found:
            f = SafetensorsFile(os.path.join(directory, fname))
            out.update({name: f for name in f.keys()})
        return out
    pickles = [x for x in os.listdir(directory) if x.endswith((".bin", ".pt", ".pth"))]
    hint = " (pickled .bin/.pt weights are never loaded: convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


class FreshMap:
    """A SafetensorsFile whose `get` maps the file anew for every tensor.

    A long-lived memory map keeps every page it has touched resident (and counted in the RSS)
    until it is unmapped, so converting through one would end with the whole source in memory.
    Here each tensor's map is released as soon as its view is dropped: the resident set holds
    the tensor in flight, not the source. (Re-reading the header costs well under 1 ms.)"""

    def __init__(self, f: SafetensorsFile):
        self._f = f
        self.path = f.path

    def keys(self):
        return self._f.keys()

    def shape(self, key):
        return self._f.shape(key)

    def dtype(self, key):
        return self._f.dtype(key)

    def nbytes(self, key):
        return self._f.nbytes(key)

    def get(self, key):
        return SafetensorsFile(self.path).get(key)


def fresh_maps(files: dict) -> dict:
    wrapped: dict[int, FreshMap] = {}
    return {name: wrapped.setdefault(id(f), FreshMap(f)) for name, f in files.items()}
