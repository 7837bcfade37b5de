"""Write a training workdir's model in the published DeepSeek checkpoint format, which transformers loads.

    python -m moe_jax.export --checkpoint=/tmp/moe_jax_default --out=/tmp/default_hf [--dtype=bfloat16] [--step=N]

Writes config.json and safetensors files (moe_jax.interop.huggingface.save: per-expert tensors, the MTP layers,
the routing biases in float32) and, for a BPE run, the tokenizer as tokenizer.json + tokenizer_config.json (its
<bos>), so `generate --checkpoint=hf:OUT --prompt=TEXT` and `--config.init_from=hf:OUT` work. --dtype defaults to
the parameters' own (float32 as trained: the weights bit for bit). An --out that already holds a checkpoint is
refused unless --overwrite.
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
from absl import app, flags, logging

from moe_jax.cli import fail, load_model_or_exit
from moe_jax.data.tokenizer import BPETokenizer, save_published
from moe_jax.interop import huggingface
from moe_jax.restore import HF_PREFIX
from moe_jax.platforms import prefer_cpu_without_accelerators

DTYPES = ("float32", "bfloat16")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir (its newest checkpoint, or --step).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that restores).")
_OUT = flags.DEFINE_string("out", None, "Directory to write the published-format checkpoint to.")
_DTYPE = flags.DEFINE_enum("dtype", None, DTYPES, "Storage dtype (default: the parameters' own).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a checkpoint already in --out.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  prefer_cpu_without_accelerators()  # no plugin noise before jax falls back to the CPU
  logging.set_verbosity(logging.WARNING)  # Orbax logs its restore at INFO
  if _CHECKPOINT.value.startswith(HF_PREFIX):
    fail("--checkpoint is already in the published format; give a training workdir")
  model = load_model_or_exit(_CHECKPOINT.value, _STEP.value)
  try:
    dtype = None if _DTYPE.value is None else jnp.dtype(_DTYPE.value)
    files = huggingface.save(model.config, model.variables, _OUT.value, dtype=dtype, overwrite=_OVERWRITE.value)
  except (FileExistsError, ValueError) as e:
    fail(e)
  if isinstance(model.tokenizer, BPETokenizer):
    files += save_published(model.tokenizer, _OUT.value)
  else:
    print("note: the run used the byte tokenizer, which has no tokenizer.json; give --prompt_ids to generate",
          file=sys.stderr)
  print(f"wrote {len(files)} files of {model.description} to {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flag_as_required("checkpoint")
  flags.mark_flag_as_required("out")
  app.run(main)
