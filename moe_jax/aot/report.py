"""What a compiled program says about itself: per-device memory against the device's HBM, the collectives in the
optimised HLO, and FLOPs beside the planner's model FLOPs.

- memory: `Compiled.memory_analysis()`. total = arguments + outputs - aliased (donated) + temporaries: what the
  program holds at its peak on each device (generated code excluded: it lives in instruction memory).
- collectives: every all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute (sync, or an async
  pair counted once at its -done) in the compiled module text, count and result bytes by kind. A static count: a
  loop's body (scanned layers, the decode loop) is counted once, however often it runs.
- FLOPs per device: TPU -- XLA:TPU's cost analysis of the partitioned program (redundant work included);
  GPU -- XLA:GPU reports none, so they are counted from the compiled per-device module: 2 x output elements x
  contracted elements for every dot and ragged-dot (a ragged-dot at its useful cost, whatever XLA lowers it to).
  Only matmuls count, and kernel custom calls (Mosaic GPU, cuDNN) count as zero: the ratio to the planner then
  falls by their share. (The CPU backend's cost analysis of the unpartitioned program cannot serve: a shard_map
  body is counted once at its per-device shape while everything else is global.)
"""

from __future__ import annotations

import collections
import re
from typing import Any

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all",
               "collective-broadcast")
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")
_ARRAY = re.compile(r"([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, tuples summed ("(bf16[2,4]{1,0}, f32[])" -> 20)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES.get(dtype, 1)  # fp8 types and anything unknown: 1 byte
  return total


def collectives(hlo_text: str) -> dict:
  """{kind: {"count", "bytes"}} of the collectives in a compiled module's text (see the module docstring)."""
  out: dict = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  for line in hlo_text.splitlines():
    m = _OP.match(line)
    if not m or m.group(3) == "-start":
      continue
    out[m.group(2)]["count"] += 1
    out[m.group(2)]["bytes"] += shape_bytes(m.group(1))
  return dict(sorted(out.items()))


def memory(compiled: Any) -> dict:
  ma = compiled.memory_analysis()
  args, outs, alias, temp = (int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
  return {"argument_bytes": args, "output_bytes": outs, "alias_bytes": alias, "temp_bytes": temp,
          "total_bytes": args + outs - alias + temp}


def compiled_flops(compiled: Any) -> float | None:
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):  # older jax returned one dict per program
    costs = costs[0] if costs else None
  flops = (costs or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")
_DIMS = re.compile(r"\[([\d,]*)\]")


def _dims(shape: str) -> list[int]:
  m = _DIMS.search(shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def matmul_flops(hlo_text: str) -> dict:
  """{"flops", "dots", "custom_calls"} of a compiled module's text: 2 x output elements x contracted elements summed
  over every dot and ragged-dot (fusion bodies included; a loop body counted once), and how many kernel custom
  calls it holds (their FLOPs are not counted)."""
  shapes, dots, customs = {}, [], 0
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    shapes[name] = shape
    if op in ("dot", "ragged-dot"):
      dots.append((shape, rest))
    elif op == "custom-call" and ("mosaic" in rest or "cudnn" in rest or "tpu_custom_call" in rest):
      customs += 1
  flops = 0
  for shape, rest in dots:
    lhs = re.match(r"\s*%([\w.\-]+)", rest)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    if not lhs or lhs.group(1) not in shapes:
      continue
    lhs_dims = _dims(shapes[lhs.group(1)])
    k = 1
    for i in (int(d) for d in contracting.group(1).split(",") if d) if contracting else ():
      k *= lhs_dims[i]
    n = 1
    for d in _dims(shape):
      n *= d
    flops += 2 * n * k
  return {"flops": float(flops), "dots": len(dots), "custom_calls": customs}
