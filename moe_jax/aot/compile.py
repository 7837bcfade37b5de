"""`compile_for_target(config, target)`: compile a config's programs for hardware this host does not have, and
report what the compilers say -- the library behind `python -m moe_jax.compile`.

What a deviceless compile cannot tell (docs/compile.md): nothing runs, so no numerics, no step time and no
communication cost; XLA:GPU does not autotune without a device (it compiles its default GEMM configurations) and
cuDNN attention's execution plan is only chosen on one; the memory is the compiler's static buffer assignment,
without the runtime's allocator slack, NCCL/ICI buffers or fragmentation.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import ml_collections

from moe_jax.aot import report
from moe_jax.aot.programs import STEPS, Programs
from moe_jax.aot.targets import GiB, Target, parse_target, target_devices
from moe_jax.kernels.interpret import kernels_for
from moe_jax.planning import flops_per_token


def _model_flops_per_device(config: Any, step: str, tokens: int, devices: int) -> float | None:
  """The planner's model FLOPs for one call of `step`, per device: training 6N + attention per token; a forward
  (eval) a third of it. None for generation (its decode loop is one HLO body, counted once by XLA)."""
  per_token = flops_per_token(config.model, config.data.seq_len)["total"]
  if step == "train":
    return per_token * tokens / devices
  if step == "eval":
    return per_token / 3 * tokens / devices
  return None


def compile_step(programs: Programs, step: str, target: Target) -> dict:
  """One step's row of the report; {"compiled": False, "error": ...} when the compiler refuses it."""
  t0 = time.perf_counter()
  try:
    lowered = programs.lower(step)
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 -- reported per step; the caller exits non-zero
    message = str(e).splitlines()[0] if str(e) else ""
    return {"compiled": False, "error": f"{type(e).__name__}: {message}"[:2000], "fits": False if
            "RESOURCE_EXHAUSTED" in message else None, "out_of_memory": "RESOURCE_EXHAUSTED" in message,
            "compile_seconds": time.perf_counter() - t0}
  seconds = time.perf_counter() - t0
  mem = report.memory(compiled)
  text = compiled.as_text()
  counted = report.matmul_flops(text)
  if target.platform == "tpu":
    flops, source = report.compiled_flops(compiled), "xla_tpu_cost_analysis"
  else:
    flops, source = counted["flops"] or None, "compiled_hlo_matmuls"
  model = _model_flops_per_device(programs.config, step, programs.tokens(step), target.devices)
  return {"compiled": True, "compile_seconds": seconds, "memory": mem, "hbm_bytes": target.hbm_bytes,
          "fits": mem["total_bytes"] <= target.hbm_bytes, "flops": flops, "flops_source": source,
          "model_flops": model, "flops_ratio": (flops / model) if flops and model else None,
          "kernel_custom_calls": counted["custom_calls"],
          "collectives": report.collectives(text)}


def compile_for_target(config: ml_collections.ConfigDict, target: str | Target, steps: Sequence[str] = STEPS, *,
                       num_slices: int = 1, prompt_len: int | None = None, new_tokens: int | None = None,
                       log: Callable[[str], None] = lambda m: None) -> dict:
  """The report (the CLI's --json object): {"target", "devices", "mesh", "gmm_backend", "attention_impl", "steps":
  {step: row}}. Config and target errors raise ValueError before anything compiles; a step the compiler refuses is
  a row with "compiled": false."""
  target = parse_target(target, num_slices) if isinstance(target, str) else target
  bad = [s for s in steps if s not in STEPS]
  if bad or not steps:
    raise ValueError(f"--steps={','.join(steps)}: each must be one of {STEPS}")
  devices = target_devices(target)
  programs = Programs(config, devices, prompt_len=prompt_len, new_tokens=new_tokens)
  out = {"target": target.name, "platform": target.platform, "device_kind": devices[0].device_kind,
         "devices": target.devices, "hosts": target.hosts, "num_slices": target.num_slices,
         "mesh": dict(programs.mesh.shape), **programs.kernels, "hbm_bytes": target.hbm_bytes, "steps": {}}
  log(f"{target.name}: {target.devices} x {devices[0].device_kind} ({target.hbm_bytes / GiB:.1f} GiB each), mesh "
      f"{' x '.join(f'{a}={n}' for a, n in programs.mesh.shape.items())}; gmm {programs.kernels['gmm_backend']}, "
      f"attention {programs.kernels['attention_impl']}")
  with kernels_for(devices):  # the planner's abstract model traces (parameter counts) see the target's kernels too
    for step in steps:
      log(f"compiling {step} ...")
      out["steps"][step] = row = compile_step(programs, step, target)
      log(format_row(step, row))
  return out


def _gib(n: float) -> str:
  return f"{n / GiB:.2f} GiB"


def format_row(step: str, row: dict) -> str:
  if not row["compiled"]:
    return f"  {step}: does NOT compile ({row['compile_seconds']:.1f} s): {row['error']}"
  m = row["memory"]
  lines = [f"  {step}: compiled in {row['compile_seconds']:.1f} s",
           f"    per device: arguments {_gib(m['argument_bytes'])}, outputs {_gib(m['output_bytes'])} (aliased "
           f"{_gib(m['alias_bytes'])}), temporaries {_gib(m['temp_bytes'])}, total {_gib(m['total_bytes'])} of "
           f"{_gib(row['hbm_bytes'])} HBM: {'fits' if row['fits'] else 'DOES NOT FIT'}"]
  if row["flops"] is not None:
    ratio = f" = {row['flops_ratio']:.2f} x the planner's {row['model_flops']:.3e}" if row["flops_ratio"] else ""
    note = ("XLA:TPU's cost analysis; a loop body counted once" if row["flops_source"] == "xla_tpu_cost_analysis"
            else "matmuls of the compiled HLO" + (f"; {row['kernel_custom_calls']} kernel calls not counted"
                                                  if row["kernel_custom_calls"] else ""))
    lines.append(f"    FLOPs per device: {row['flops']:.3e} ({note}){ratio}")
  coll = ", ".join(f"{k} {v['count']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in row["collectives"].items())
  lines.append(f"    collectives: {coll or 'none'}")
  return "\n".join(lines)


def failures(result: dict) -> list[str]:
  """One line per step that did not compile or does not fit: the step, the device and the bytes."""
  out = []
  for step, row in result["steps"].items():
    where = f"{result['target']} ({result['device_kind']}, {result['devices']} devices)"
    if not row["compiled"] and row.get("out_of_memory"):  # XLA:TPU refuses a program larger than HBM
      out.append(f"the {step} step does not fit on {where}: {row['error']}")
    elif not row["compiled"]:
      out.append(f"the {step} step does not compile for {where}: {row['error']}")
    elif not row["fits"]:
      out.append(f"the {step} step does not fit on {where}: {row['memory']['total_bytes']:,} bytes per device "
                 f"({_gib(row['memory']['total_bytes'])}) > {row['hbm_bytes']:,} bytes of HBM "
                 f"({_gib(row['hbm_bytes'])})")
  return out
