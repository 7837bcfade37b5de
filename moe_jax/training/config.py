"""The experiment config schema (everything but the model, which is moe_jax.config) and its validation.

  config.seed        int: parameter init and data shuffling
  config.init_from   str | None: a fresh run starts from these weights (a training workdir or hf:DIR; DSA indexers
                     the source lacks start fresh: moe_jax.training.init_from); None = random init
  config.model       moe_jax.config.base_model_config() schema
  config.data        base_data_config()
  config.train       base_train_config()
  config.checkpoint  base_checkpoint_config()
  config.mesh        moe_jax.sharding.base_mesh_config(): mesh axis sizes, logical-axis rules, multi-host
  config.finetune    optional: moe_jax.training.finetune.base_finetune_config(), full | ESFT | LoRA
                     (configs/finetune.py)

`validate_config` raises ValueError naming the field and the allowed values; the trainer calls it before
building anything, so a bad combination never reaches a compile.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder  # a None field the command line can set

from moe_jax.config import validate_model_config
from moe_jax.data.sources import SOURCES
from moe_jax.data.tokenizer import TOKENIZERS
from moe_jax.sharding import base_mesh_config, check_mesh_sizes, rules_of
from moe_jax.training.balancing import BIAS_UPDATE_RULES
from moe_jax.training.finetune import validate_finetune_config
from moe_jax.training.optimizer import TRAINABLE
from moe_jax.training.schedules import SCHEDULE_UNITS


def base_data_config() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.source = "embedded"  # embedded (Python stdlib) | text | jsonl | sft_jsonl (conversations, loss on the replies)
  #                        | parquet | array_record (moe_jax.data.sources)
  d.paths = ()  # files or globs for text/jsonl/parquet/array_record
  d.text_field = "text"  # the JSON field / Parquet column holding each document
  d.max_document_bytes = 1 << 20  # longer texts are cut into pieces of about this size (at line ends) before
  #                                 tokenising, so memory follows the piece, not the document
  d.validation_fraction = 0.05  # share of documents held out, chosen by a hash of each document's key
  d.tokenizer = "bpe"  # byte (256 bytes + <bos>) | bpe (byte-level BPE trained on the train split, or loaded)
  d.tokenizer_path = placeholder(str)  # a tokenizer.json to load instead of training one (bpe only)
  d.bpe_vocab_size = 2048  # BPE vocabulary incl. <bos> when training one; config.model.vocab_size must cover it
  d.shuffle_window = 512  # packed rows shuffled together (a long document fills many rows); 0 or 1 = off
  d.seq_len = 256  # tokens per packed row
  d.batch_size = 16  # rows per global batch (the full size, after batch-size warm-up)
  return d


def base_train_config() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.num_steps = 1000  # optimiser steps
  t.log_every = 10  # steps between metrics.jsonl lines and progress lines
  t.eval_every = 250  # steps between held-out evaluations (0 = only at the end)
  t.eval_batches = 8  # batches of the periodic evaluation; the final one covers the whole validation split
  t.schedule_unit = "steps"  # unit of every schedule boundary below except warmup_steps: steps | tokens
  t.learning_rate = 2.2e-4  # peak learning rate (V3: 2.2e-4)
  t.warmup_steps = 2000  # linear LR warm-up, in steps (V3: 2000)
  t.lr_decay_start = 0  # where the cosine decay starts
  t.lr_decay_length = -1  # cosine decay length; -1 = to the end of training
  t.lr_final = 2.2e-5  # LR at the end of the cosine, held afterwards (V3: 2.2e-5)
  t.lr_tail = ()  # ((point, lr), ...): constant LRs from each point on (V3: ((14.633e12, 7.3e-6),))
  t.batch_size_start = 1  # live rows at the start of batch-size warm-up, if any (V3: 3072 of 15360)
  t.batch_warmup = 0  # length of the linear batch-size ramp to data.batch_size; 0 = off (V3: 469B tokens)
  t.mtp_weight = 0.3  # MTP loss weight lambda (V3: 0.3)
  t.mtp_weight_after = 0.1  # lambda after mtp_weight_switch (V3: 0.1)
  t.mtp_weight_switch = -1  # where lambda switches; -1 = never (V3: 10T tokens)
  t.bias_update_rate = 0.001  # loss-free balancing speed gamma; 0 = balancing off (V3: 0.001)
  t.bias_update_rule = "sign"  # sign: b += gamma*sign(mean-load) (V3) | proportional: b += gamma*(mean-load)/mean
  t.bias_update_stop = -1  # where gamma drops to 0; -1 = never (V3: 14.3T tokens)
  t.weight_decay = 0.1  # decoupled AdamW decay, matrices only (V3: 0.1)
  t.adam_b1 = 0.9  # (V3: 0.9)
  t.adam_b2 = 0.95  # (V3: 0.95)
  t.adam_eps = 1e-8  # Adam epsilon
  t.grad_clip_norm = 1.0  # global-norm gradient clipping (V3: 1.0)
  t.trainable = "all"  # all | indexer: only the DSA indexers train (V3.2's dense warm-up; the routing biases hold)
  t.index_loss_weight = 1.0  # weight of the DSA indexer's KL loss (model.index_n_heads set) in the training loss
  t.tensorboard = True  # also write TensorBoard event files under WORKDIR/tensorboard
  return t


def base_checkpoint_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every = 200  # steps between checkpoints (0 = only at the end)
  c.keep = 3  # newest checkpoints kept
  c.async_save = True  # write checkpoints in the background
  c.restore = "latest"  # latest: resume from the newest checkpoint that verifies (error if none does) | never:
  #                       start over, moving what the workdir holds to WORKDIR/previous/<time>/ (nothing deleted)
  return c


RESTORE_MODES = ("latest", "never")


def _require(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(f"invalid config: {msg}")


def _int_at_least(section: Any, prefix: str, name: str, low: int) -> None:
  v = section[name]
  _require(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"{prefix}.{name}={v!r} must be an integer >= {low}")


def validate_config(config: Any) -> None:
  """Checks the whole experiment config; raises ValueError("invalid config: ...") naming the field."""
  for section in ("model", "data", "train", "checkpoint", "mesh"):
    _require(section in config, f"config.{section} is missing")
  unknown_sections = set(config.keys()) - {"model", "data", "train", "checkpoint", "mesh", "finetune", "seed",
                                           "init_from"}
  _require(not unknown_sections, f"unknown fields config.{sorted(unknown_sections)}")
  for name, schema in (("data", base_data_config()), ("train", base_train_config()),
                       ("checkpoint", base_checkpoint_config()), ("mesh", base_mesh_config())):
    unknown = set(config[name].keys()) - set(schema.keys())
    _require(not unknown, f"unknown fields config.{name}.{sorted(unknown)}; see moe_jax.training.config")
    missing = set(schema.keys()) - set(config[name].keys())
    _require(not missing, f"config.{name} lacks {sorted(missing)}")
  _require(isinstance(config.get("seed"), int), f"config.seed={config.get('seed')!r} must be an integer")
  validate_model_config(config.model)
  validate_finetune_config(config)
  d, t, c = config.data, config.train, config.checkpoint
  _require(d.source in SOURCES, f"config.data.source={d.source!r} is not one of {SOURCES}")
  _require(d.tokenizer in TOKENIZERS, f"config.data.tokenizer={d.tokenizer!r} is not one of {TOKENIZERS}")
  _require(0.0 < d.validation_fraction < 1.0,
           f"config.data.validation_fraction={d.validation_fraction} must be in (0, 1)")
  _int_at_least(d, "config.data", "seq_len", 16)
  _int_at_least(d, "config.data", "batch_size", 1)
  _int_at_least(d, "config.data", "shuffle_window", 0)
  _int_at_least(d, "config.data", "max_document_bytes", 4096)
  if d.tokenizer == "bpe" and not d.tokenizer_path:
    _require(d.bpe_vocab_size > 257, f"config.data.bpe_vocab_size={d.bpe_vocab_size} must be > 257")
    _require(config.model.vocab_size >= d.bpe_vocab_size,
             f"config.model.vocab_size={config.model.vocab_size} < config.data.bpe_vocab_size={d.bpe_vocab_size}")
  if d.tokenizer == "byte":
    _require(config.model.vocab_size >= 257,
             f"config.model.vocab_size={config.model.vocab_size} < 257 (the byte tokenizer's 256 bytes + <bos>)")
  if d.source != "embedded":
    _require(len(d.paths) > 0, f"config.data.source={d.source!r} needs config.data.paths (files or globs)")
  _require(d.source != "array_record" or d.tokenizer == "byte" or d.tokenizer_path,
           "config.data.source='array_record' holds token ids: give the tokenizer that made them "
           "(config.data.tokenizer='byte' or config.data.tokenizer_path)")
  _int_at_least(t, "config.train", "num_steps", 1)
  _int_at_least(t, "config.train", "log_every", 1)
  _int_at_least(t, "config.train", "eval_every", 0)
  _int_at_least(t, "config.train", "eval_batches", 1)
  _int_at_least(t, "config.train", "warmup_steps", 0)
  _require(t.schedule_unit in SCHEDULE_UNITS, f"config.train.schedule_unit={t.schedule_unit!r} is not one of {SCHEDULE_UNITS}")
  _require(t.learning_rate > 0, f"config.train.learning_rate={t.learning_rate} must be > 0")
  _require(0 <= t.lr_final <= t.learning_rate, f"config.train.lr_final={t.lr_final} must be in [0, learning_rate]")
  _require(t.lr_decay_length == -1 or t.lr_decay_length > 0,
           f"config.train.lr_decay_length={t.lr_decay_length} must be > 0 or -1 (to the end)")
  for i, item in enumerate(t.lr_tail):
    _require(len(item) == 2 and item[1] >= 0, f"config.train.lr_tail[{i}]={item!r} must be (point, lr >= 0)")
  _require(t.batch_warmup == 0 or 1 <= t.batch_size_start <= d.batch_size,
           f"config.train.batch_size_start={t.batch_size_start} must be in [1, config.data.batch_size={d.batch_size}]")
  _require(t.batch_warmup >= 0, f"config.train.batch_warmup={t.batch_warmup} must be >= 0")
  _require(t.mtp_weight >= 0 and t.mtp_weight_after >= 0, "config.train.mtp_weight and mtp_weight_after must be >= 0")
  _require(t.bias_update_rate >= 0, f"config.train.bias_update_rate={t.bias_update_rate} must be >= 0")
  _require(t.bias_update_rule in BIAS_UPDATE_RULES,
           f"config.train.bias_update_rule={t.bias_update_rule!r} is not one of {BIAS_UPDATE_RULES}")
  _require(t.bias_update_rate == 0 or config.model.topk_method == "noaux_tc",
           f"config.train.bias_update_rate={t.bias_update_rate} needs config.model.topk_method='noaux_tc' "
           f"(the only router with a selection bias), got {config.model.topk_method!r}")
  _require(t.trainable in TRAINABLE, f"config.train.trainable={t.trainable!r} is not one of {TRAINABLE}")
  _require(t.trainable == "all" or config.model.index_n_heads is not None,
           "config.train.trainable='indexer' needs a DSA model (config.model.index_n_heads)")
  _require(t.index_loss_weight >= 0, f"config.train.index_loss_weight={t.index_loss_weight} must be >= 0")
  init_from = config.get("init_from")
  _require(init_from is None or (isinstance(init_from, str) and init_from),
           f"config.init_from={init_from!r} must be a training workdir, hf:DIR, or None")
  _require(t.grad_clip_norm > 0, f"config.train.grad_clip_norm={t.grad_clip_norm} must be > 0")
  _require(t.weight_decay >= 0, f"config.train.weight_decay={t.weight_decay} must be >= 0")
  _require(0 <= t.adam_b1 < 1 and 0 <= t.adam_b2 < 1, "config.train.adam_b1 and adam_b2 must be in [0, 1)")
  _int_at_least(c, "config.checkpoint", "every", 0)
  _int_at_least(c, "config.checkpoint", "keep", 1)
  _require(c.restore in RESTORE_MODES, f"config.checkpoint.restore={c.restore!r} is not one of {RESTORE_MODES}")
  validate_mesh_config(config)


def validate_mesh_config(config: Any) -> None:
  """Mesh sizes and rules; the divisions that need the device count are checked when the mesh is built."""
  m, model = config.mesh, config.model
  check_mesh_sizes(m)
  rules_of(m)
  if m.expert > 1:
    _require(model.n_routed_experts % m.expert == 0,
             f"config.model.n_routed_experts={model.n_routed_experts} is not divisible by config.mesh.expert={m.expert}")
  d = config.data
  fixed = 1
  for a in ("data", "fsdp", "expert"):
    fixed *= max(m[a], 1)
  _require(d.batch_size % fixed == 0,
           f"config.data.batch_size={d.batch_size} is not divisible by config.mesh data x fsdp x expert = {fixed} "
           "(the batch is split over all three)")
