"""Fine-tuning a trained or published checkpoint: full, ESFT (gate or token relevance) or LoRA, on SFT
conversations or plain text. The model config is the checkpoint's (moe_jax.training.finetune): set only
runtime fields (dtype, attention_impl, remat_policy, ...) under config.model.

    python -m moe_jax.train --config=configs/finetune.py --workdir=W --config.init_from=hf:DIR \\
        --config.finetune.method=esft_gate --config.data.source=sft_jsonl --config.data.paths=chat.jsonl

The learning-rate schedule is a fine-tuning one (short warm-up, a low peak, cosine to 10%); a BPE checkpoint's
tokenizer comes with it (a workdir's tokenizer.json, or set config.data.tokenizer_path to hf:DIR's tokenizer.json).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from moe_jax.config import base_model_config
from moe_jax.sharding import base_mesh_config
from moe_jax.training.config import base_checkpoint_config, base_data_config, base_train_config
from moe_jax.training.finetune import base_finetune_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # data order (and fresh LoRA factors)
  config.init_from = placeholder(str)  # required: a training workdir or hf:DIR
  config.model = base_model_config()  # replaced by the checkpoint's; only runtime fields may be set here

  config.finetune = base_finetune_config()  # moe_jax.training.finetune documents every field
  config.finetune.method = "esft_gate"  # full | esft_gate | esft_token | lora
  config.finetune.esft_threshold = 0.2  # ESFT: per layer, the fewest experts holding this share of the relevance
  config.finetune.esft_sample_batches = 8  # ESFT: task batches the relevance is measured on
  config.finetune.lora_rank = 8  # LoRA rank r
  config.finetune.lora_alpha = 16.0  # LoRA scale alpha (update x alpha / r)
  config.finetune.lora_targets = ("attention", "experts")  # LoRA: attention | experts | shared_experts | mlp
  config.finetune.general_eval = False  # also score the held-out split of the init_from run (forgetting)

  config.data = base_data_config()  # moe_jax.training.config documents every field
  config.data.source = "sft_jsonl"  # {"prompt", "response"} or {"messages": [...]} lines; loss on replies only
  config.data.tokenizer = "bpe"  # the checkpoint's tokenizer (a workdir's is copied; else tokenizer_path)
  config.data.seq_len = 256  # tokens per packed row
  config.data.batch_size = 16  # rows per step

  config.train = base_train_config()
  config.train.num_steps = 500  # fine-tuning steps
  config.train.log_every = 10  # progress cadence
  config.train.eval_every = 100  # periodic held-out estimate
  config.train.learning_rate = 1e-4  # peak LR (ESFT's recipe uses 1e-5 at V2-Lite scale; small models take more)
  config.train.warmup_steps = 20  # linear warm-up
  config.train.lr_decay_start = 20  # cosine from the end of warm-up ...
  config.train.lr_final = 1e-5  # ... to 10% of peak
  config.train.weight_decay = 0.0  # no decay towards zero of weights that start trained
  config.train.bias_update_rate = 0.0  # the checkpoint's routing biases hold (ESFT and LoRA freeze them anyway)
  config.train.mtp_weight = 0.0  # the main model's loss only (a checkpoint may come without MTP modules)
  config.train.mtp_weight_after = 0.0

  config.checkpoint = base_checkpoint_config()
  config.checkpoint.every = 100  # steps between checkpoints
  config.checkpoint.keep = 2  # newest kept

  config.mesh = base_mesh_config()  # every device on `data` by default
  return config
