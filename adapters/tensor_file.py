"""Reads a safetensors file into CPU tensors with one read and no per-tensor Python beyond a view.

Adapters load beside a running decode loop in the same process, so the Python time of a load is time the
decode loop may wait for the interpreter lock. `safetensors.torch.load_file` builds every tensor through
Python-level storage slicing (~15 us each; a rank-16 adapter on all 7 projections of a 30-layer model has
420 tensors); here the file is read into one buffer (`readinto`, which releases the lock) and each tensor
is a `torch.frombuffer` view of it. The format: an 8-byte little-endian header size, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data. Every field is
checked; anything off raises `TensorFileError` with what was wrong.
"""

import json
import math
import os
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 * 2**20


class TensorFileError(ValueError):
    pass


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    size = os.path.getsize(path)
    buffer = bytearray(size)
    with open(path, "rb", buffering=0) as f:
        if f.readinto(buffer) != size:
            raise TensorFileError("the file changed size while it was read")
    if size < 8:
        raise TensorFileError(f"{size} bytes is too short for a safetensors file")
    header_size = int.from_bytes(buffer[:8], "little")
    if header_size > min(size - 8, MAX_HEADER):
        raise TensorFileError(f"header of {header_size} bytes does not fit the {size}-byte file (truncated?)")
    try:
        header = json.loads(bytes(buffer[8:8 + header_size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFileError("header is not a JSON object")
    data_start, data_size = 8 + header_size, size - 8 - header_size
    return {name: _tensor(name, info, buffer, data_start, data_size)
            for name, info in header.items() if name != "__metadata__"}


def _tensor(name: str, info, buffer: bytearray, data_start: int, data_size: int) -> torch.Tensor:
    if not isinstance(info, dict):
        raise TensorFileError(f"tensor {name!r}: header entry is not an object")
    dtype = DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise TensorFileError(f"tensor {name!r}: unknown dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise TensorFileError(f"tensor {name!r}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise TensorFileError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    begin, end = offsets
    numel, itemsize = math.prod(shape), dtype.itemsize
    if not 0 <= begin <= end <= data_size:
        raise TensorFileError(f"tensor {name!r}: data [{begin}, {end}) lies outside the {data_size} data bytes "
                              f"(truncated?)")
    if end - begin != numel * itemsize:
        raise TensorFileError(f"tensor {name!r}: {end - begin} bytes for shape {shape} of {info['dtype']}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=numel, offset=data_start + begin).view(shape)
