"""What a compiled program says about itself: per-device memory against the device's HBM, the collectives in the
optimised HLO, and FLOPs beside the planner's model FLOPs.

- memory: `Compiled.memory_analysis()`. total = arguments + outputs - aliased (donated) + temporaries: what the
  program holds at its peak on each device (generated code excluded: it lives in instruction memory).
- collectives: every all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute (sync, or an async
  pair counted once at its -done) in the compiled module text, count and result bytes by kind. A static count: a
  loop's body (scanned layers, the decode loop) is counted once, however often it runs.
- FLOPs per device. TPU: XLA:TPU's cost analysis of the partitioned program (it prices the Pallas kernels'
  custom calls and counts redundant work, but a while loop's body once: with scanned layers it is per layer stack
  pass, not per step). GPU: XLA:GPU has none, so `matmul_flops` counts the compiled per-device module: 2 x output
  elements x contracted elements of every dot and ragged-dot (the latter at its useful cost), through the call
  graph, a loop body times its known trip count. Kernel custom calls (Mosaic GPU, cuDNN) count zero there: the
  ratio to the planner falls by their share. (XLA:TPU writes its dots as convolutions, batched ones with window
  tricks, so the same count does not carry over; and the CPU backend's analysis of the unpartitioned program
  cannot serve: a shard_map body is counted once at its per-device shape while everything else is global.)
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


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_CALLED = re.compile(r"(calls|body|to_apply|branch_computations|true_computation|false_computation)=\{?([^,}]+(?:,"
                     r"\s*%[\w.\-]+)*)\}?")
_TRIP = re.compile(r'known_trip_count"?\s*:\s*\{\s*"?n"?\s*:\s*"?(\d+)')


def _dot_flops(shape: str, rest: str, shapes: dict) -> int:
  lhs = re.match(r"\s*%([\w.\-]+)", rest)
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
  if not lhs or lhs.group(1) not in shapes:
    return 0
  lhs_dims = _dims(shapes[lhs.group(1)])
  k = 1
  for i in (int(d) for d in contracting.group(1).split(",") if d) if contracting else ():
    k *= lhs_dims[i]
  n = 1
  for d in _dims(shape):
    n *= d
  return 2 * n * k


def matmul_flops(hlo_text: str) -> dict:
  """{"flops", "dots", "custom_calls"} of a compiled module's text: 2 x output elements x contracted elements summed
  over every dot and ragged-dot executed from the entry computation -- through fusions and calls once per call
  site, a while loop's body times its known trip count (a scanned layer stack counts every layer) -- and how many
  kernel custom calls it holds (their FLOPs are not counted)."""
  shapes, comps, entry, current, customs, ndots = {}, {}, None, None, 0, 0
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = head.group(1)
      comps[current] = {"flops": 0, "calls": []}
      if line.startswith("ENTRY"):
        entry = current
      continue
    m = _INSTR.match(line)
    if not m or current is None:
      continue
    name, shape, op, rest = m.groups()
    shapes[name] = shape
    if op in ("dot", "ragged-dot"):
      comps[current].setdefault("dots", []).append((op, shape, rest))
      ndots += 1
    elif op == "custom-call" and ("mosaic" in rest or "cudnn" in rest or "tpu_custom_call" in rest):
      customs += 1
    trip = _TRIP.search(rest)
    for kind, names in _CALLED.findall(rest):
      times = int(trip.group(1)) if (op == "while" and kind == "body" and trip) else 1
      comps[current]["calls"].extend((n.strip().lstrip("%"), times) for n in names.split(",") if n.strip())
  for comp in comps.values():
    comp["flops"] = sum(_dot_flops(shape, rest, shapes) for _, shape, rest in comp.pop("dots", []))
  memo: dict = {}

  def total(name: str, depth: int = 0) -> int:
    if name not in comps or depth > 64:
      return 0
    if name not in memo:
      memo[name] = comps[name]["flops"] + sum(times * total(c, depth + 1) for c, times in comps[name]["calls"])
    return memo[name]

  flops = total(entry) if entry else sum(c["flops"] for c in comps.values())
  return {"flops": float(flops), "dots": ndots, "custom_calls": customs}
