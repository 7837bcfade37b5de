"""ESFT's expert selection (Wang et al. 2024, "Let the Expert Stick to His Last", sec. 3.2-3.3).

On a sample of the task's training data, per MoE layer l and routed expert i, over the sample's N tokens:
  ESFT-Gate   r_i = (1/N) sum_t g_i,t            the average gating weight (0 where i is not among the top-K)
  ESFT-Token  r_i = (1/(N K)) sum_t 1[i in TopK(t)]   the share of token-expert assignments
Both are normalised to sum to 1 over the layer's experts (the routed scaling factor and K cancel), and the layer's
selection is the smallest set of experts, taken in decreasing relevance, whose cumulative relevance reaches the
threshold p (`config.finetune.esft_threshold`). Ties keep the lower expert id first.

Tokens are weighted equally (the paper averages per sample first; packed rows have no sample boundary to average
over). The selection is written to WORKDIR/esft_experts.json as {"<layer>": [expert ids]} with layers numbered as
in the published checkpoint (model.layers.<i>: first_k_dense_replace + the MoE layer's ordinal); a resumed run
reads it back instead of measuring again.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from moe_jax.training.checkpoint import write_json

SELECTION_FILE = "esft_experts.json"


def relevance(gate_sum_LE: np.ndarray, load_LE: np.ndarray, method: str) -> np.ndarray:
  """[L, E] relevance, each layer's row summing to 1 (a layer that saw no token gets a uniform row)."""
  r = np.asarray(gate_sum_LE if method == "esft_gate" else load_LE, np.float64)
  total = r.sum(axis=-1, keepdims=True)
  return np.where(total > 0, r / np.where(total > 0, total, 1.0), 1.0 / r.shape[-1])


def select(relevance_LE: np.ndarray, threshold: float) -> list[list[int]]:
  """Per layer, the fewest experts (by decreasing relevance) whose relevance sums to >= threshold; sorted ids."""
  out = []
  for r in relevance_LE:
    order = np.argsort(-r, kind="stable")
    n = int(np.searchsorted(np.cumsum(r[order]), threshold - 1e-12)) + 1
    out.append(sorted(int(e) for e in order[:min(n, len(r))]))
  return out


def measure(eval_step, params, router_bias, batches, token_bytes) -> tuple[np.ndarray, np.ndarray]:
  """(gate_sum [L, E], expert_load [L, E]) summed over `batches` (global arrays) with the eval step."""
  gate, load = None, None
  for batch in batches:
    out = eval_step(params, router_bias, batch, token_bytes)
    g, l = np.asarray(out["gate_sum"], np.float64), np.asarray(out["expert_load"], np.float64)
    gate, load = (g, l) if gate is None else (gate + g, load + l)
  return gate, load


def choose(gate_sum_LE, load_LE, method: str, threshold: float, first_moe_layer: int, workdir: str,
           log: Callable[[str], None], write: bool = True) -> dict[str, list[int]]:
  """The selection as {"<published layer index>": ids}; written to WORKDIR/esft_experts.json and logged."""
  r = relevance(gate_sum_LE, load_LE, method)
  chosen = select(r, threshold)
  experts = {str(first_moe_layer + j): ids for j, ids in enumerate(chosen)}
  if write:
    write_json(os.path.join(workdir, SELECTION_FILE), experts)
    write_json(os.path.join(workdir, "esft_relevance.json"),
               {str(first_moe_layer + j): [round(float(x), 6) for x in row] for j, row in enumerate(r)})
  E = r.shape[-1]
  for j, ids in enumerate(chosen):
    log(f"ESFT ({method}, p={threshold}): layer {first_moe_layer + j}: experts {ids} of {E} "
        f"(relevance {float(r[j, ids].sum()):.3f})")
  return experts


def read_selection(workdir: str) -> dict[str, list[int]]:
  path = os.path.join(workdir, SELECTION_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: this ESFT run has checkpoints but not the expert selection they "
                            "were trained with; restore it, or start over with --config.checkpoint.restore=never")
  with open(path) as f:
    return {str(k): [int(e) for e in v] for k, v in json.load(f).items()}
