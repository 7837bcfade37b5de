"""A model for inference from a training workdir or a published-format (HF) checkpoint directory.

    model = restore.load_model("/tmp/moe_jax_default")        # WORKDIR of `moe_jax.train`: newest checkpoint
    model = restore.load_model("hf:/path/to/DeepSeek-V3")      # config.json + safetensors
    model.config, model.variables ({"params", "router"}), model.tokenizer, model.description

From a workdir only the parameters and routing biases are read (moe_jax.training.saved_weights: no optimiser
state, no data iterator, checked against the fingerprint recorded at save time; an unreadable newest checkpoint
is reported and the one before it used). The tokenizer is the one the run trained with (WORKDIR/tokenizer.json,
config.data.tokenizer_path, or bytes); a published checkpoint's is its tokenizer.json, with <bos> as its
tokenizer_config.json names it (None without tokenizer.json: give token ids).
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import ml_collections

from moe_jax.data import load_tokenizer
from moe_jax.data.tokenizer import load_published
from moe_jax.interop import huggingface
from moe_jax.training.saved_weights import HF_PREFIX, read_workdir_weights


class LoadedModel(NamedTuple):
  config: Any  # model config
  variables: dict  # {"params": ..., "router": ...} (no "router" for models without a selection bias)
  tokenizer: Any  # moe_jax.data tokenizer, or None when the checkpoint carries none we can read
  description: str  # where it came from (path, step)


def _tokenizer(config: ml_collections.ConfigDict, workdir: str):
  tok = load_tokenizer(config.data, workdir)
  if tok is None:  # never train one here: it would not be the tokenizer the model learned
    raise FileNotFoundError(f"the run used a BPE tokenizer but {workdir}/tokenizer.json does not exist")
  return tok


def load_workdir(workdir: str, step: int | None = None, log: Callable[[str], None] | None = None) -> LoadedModel:
  w = read_workdir_weights(workdir, step, log)
  return LoadedModel(w.model_config, w.variables, _tokenizer(w.config, os.path.abspath(workdir)), w.description)


def load_model(spec: str, *, step: int | None = None, dtype: Any = jnp.float32,
               log: Callable[[str], None] | None = None) -> LoadedModel:
  """`spec`: a training workdir, or `hf:DIR` for a DeepseekV2/V3 checkpoint (loaded in `dtype`)."""
  if spec.startswith(HF_PREFIX):
    path = spec[len(HF_PREFIX):]
    cfg, variables = huggingface.load(path, dtype)
    tokenizer = load_published(path)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
      raise ValueError(f"{path}/tokenizer.json has {tokenizer.vocab_size} ids > the model's vocab_size "
                       f"{cfg.vocab_size}: not this model's tokenizer")
    return LoadedModel(cfg, variables, tokenizer, f"{path} (published format)")
  return load_workdir(spec, step, log)
