"""Reading and writing safetensors checkpoints tensor by tensor, FP8 and bfloat16 included.

Every file is first validated by the `safetensors` package's own parser (`safe_open`: header length within the
file, valid JSON, known dtypes, dtype x shape = byte length, byte ranges contiguous from the start of the data
section to its end -- no overlap, no gap, nothing pointing into the header), and its error is reported with the
file's name. The byte decoding is done here because safetensors' numpy backend cannot return BF16 or F8_E4M3
(numpy has neither dtype) and its torch backend would make torch a runtime dependency: the header is read again
for the offsets (8-byte little-endian length, JSON {name: {dtype, shape, data_offsets}}, raw bytes), checked
once more tensor by tensor so an error names the tensor, and tensors are memory-mapped, so reading one does not
load the file.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> int:
  """Writes one .safetensors file (tensors in the given order, C-contiguous); returns the bytes written.

  The header is padded with spaces to a multiple of 8 bytes, as the reference writer does, so every tensor
  starts aligned. Written to a temporary name and renamed: a crash never leaves a truncated file.
  """
  header, offset = {}, 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for name, arr in tensors.items():
    if arr.dtype not in _NAMES:
      raise ValueError(f"{name}: dtype {arr.dtype} cannot be written to safetensors ({sorted(_DTYPES)})")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in tensors.values():
      f.write(np.ascontiguousarray(arr).tobytes())
  os.replace(tmp, path)
  return 8 + len(blob) + offset


class InvalidSafetensors(ValueError):
  """A file that breaks the safetensors format's rules; the message names the file (and tensor)."""


def _check_tensors(path: str, header: dict, data_len: int) -> None:
  """The format's rules, tensor by tensor, with the tensor named: known dtype, non-negative integer shape,
  dtype x shape = byte length, and ranges that tile [0, data_len) exactly."""
  ranges = []
  for name, info in header.items():
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
      raise InvalidSafetensors(f"{where}: entry {info!r} lacks dtype/shape/data_offsets")
    if info["dtype"] not in _DTYPES:
      raise InvalidSafetensors(f"{where}: dtype {info['dtype']!r} is not one of {sorted(_DTYPES)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
      raise InvalidSafetensors(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len):
      raise InvalidSafetensors(f"{where}: data_offsets {offsets!r} are not a range inside the {data_len}-byte "
                               "data section")
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
    if offsets[1] - offsets[0] != nbytes:
      raise InvalidSafetensors(f"{where}: {offsets[1] - offsets[0]} bytes in data_offsets, but {info['dtype']} "
                               f"{shape} needs {nbytes}")
    ranges.append((offsets[0], offsets[1], name))
  end = 0
  for begin, stop, name in sorted(ranges):
    if begin != end:
      what = "overlaps the tensor before it" if begin < end else f"leaves a gap of {begin - end} bytes before it"
      raise InvalidSafetensors(f"{path}: tensor {name!r} at bytes {begin}..{stop} {what}")
    end = stop
  if end != data_len:
    raise InvalidSafetensors(f"{path}: the tensors cover {end} of the {data_len}-byte data section")


def read_header(path: str) -> tuple[dict, int]:
  """(header without __metadata__, byte offset of the data section), after validating the whole file's layout.
  Raises InvalidSafetensors naming the file (and the tensor where one is at fault)."""
  from safetensors import safe_open  # the format's reference parser

  size = os.path.getsize(path)
  try:
    with safe_open(path, framework="numpy"):
      pass
  except Exception as e:  # noqa: BLE001 - SafetensorError and friends: reported with the file's name
    raise InvalidSafetensors(f"{path}: not a valid safetensors file ({size} bytes): {e}") from None
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  _check_tensors(path, header, size - 8 - n)
  return header, 8 + n


class SafetensorsCheckpoint:
  """All tensors of a checkpoint directory: `model.safetensors.index.json` (sharded) or every `*.safetensors`."""

  def __init__(self, directory: str):
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    else:
      files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"no *.safetensors files (or model.safetensors.index.json) in {directory!r}")
    self._where: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is listed in the index but missing")
      header, data_start = read_header(path)
      for key, info in header.items():
        self._where[key] = (path, info, data_start)

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._where[key][1]["shape"])

  def get(self, key: str) -> np.ndarray:
    """The tensor, memory-mapped read-only (copy it before the file goes away)."""
    path, info, data_start = self._where[key]
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{key}: safetensors dtype {info['dtype']} is not supported ({sorted(_DTYPES)})")
    dtype = np.dtype(_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise ValueError(f"{key}: {end - begin} bytes do not hold {shape} of {info['dtype']}")
    if end == begin:
      return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    for key in self._where:
      yield key, self.get(key)


def dequantize_fp8_blockwise(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
  """DeepSeek-V3's FP8 release: w (e4m3, [out, in]) times its per-block scale `weight_scale_inv` [ceil(out/bo), ceil(in/bi)]."""
  out_dim, in_dim = w.shape
  bo, bi = block
  expect = (-(-out_dim // bo), -(-in_dim // bi))
  if scale_inv.shape != expect:
    raise ValueError(f"weight_scale_inv shape {scale_inv.shape} != {expect} for weight {w.shape} in {block} blocks")
  full = np.repeat(np.repeat(scale_inv.astype(np.float32), bo, axis=0), bi, axis=1)[:out_dim, :in_dim]
  return w.astype(np.float32) * full
