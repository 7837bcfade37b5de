"""Where the balance is enforced: a sequence-wise auxiliary loss, a batch-wise one, or loss-free balancing.

DeepSeek-V3 report (arXiv 2412.19437) sec. 4.5.3: validation loss on the 1B model 2.258 (sequence-wise auxiliary
loss) / 2.253 (auxiliary-loss-free) / 2.253 (batch-wise auxiliary loss); 3B 2.085 / 2.080 / 2.080: balancing
over the batch rather than each sequence leaves experts free to specialise by domain. Sigmoid gate with
normalised top-K weights (the base model). Both auxiliary losses use alpha = 1e-3 (the V3 report does not give
the ablation's alpha; 1e-3 is the Loss-Free Balancing paper's baseline).
"""

from experiments.framework.presets import base_for
from experiments.framework.spec import Claim, Experiment


def variants(scale, base):
  del scale, base
  return {
      "seq_aux": {"train.bias_update_rate": 0.0, "model.aux_loss_alpha": 1e-3, "model.seq_aux": True},
      "batch_aux": {"train.bias_update_rate": 0.0, "model.aux_loss_alpha": 1e-3, "model.seq_aux": False},
      "loss_free": {"train.bias_update_rate": 1e-3, "model.aux_loss_alpha": 0.0},
  }


PAPER = "DeepSeek-V3 (arXiv 2412.19437) sec. 4.5.3, 1B"

EXPERIMENT = Experiment(
    name="balance_loss_scope",
    title="sequence-wise vs batch-wise auxiliary loss vs loss-free balancing",
    base=lambda scale: base_for(scale, "lfb_1b"),
    variants=variants,
    claims=(
        Claim("batch-wise balancing reaches a lower validation loss than sequence-wise", "eval_loss", "batch_aux",
              "seq_aux", "lower", f"{PAPER}: 2.258 -> 2.253"),
        Claim("loss-free balancing reaches a lower validation loss than the sequence-wise loss", "eval_loss",
              "loss_free", "seq_aux", "lower", f"{PAPER}: 2.258 -> 2.253"),
    ),
    charts=("eval_loss", "max_vio_global", "max_vio_batch"),
    curves=("ce", "max_vio"),
)
