"""Load balancing: auxiliary-loss-free balancing against an auxiliary loss, nothing, V3's combination, and GShard
capacity dropping.

Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts" (arXiv 2408.15664),
Table 2: on the 1B model (sigmoid gate) validation PPL 9.56 (aux loss, alpha = 1e-3) -> 9.50 (loss-free, u = 1e-3)
and MaxVio_global 0.72 -> 0.04. The loss-free method adds a per-expert bias to the routing scores for top-K
selection only, moved by u * sign(mean load - load) after each batch (the paper's Algorithm 1).

Variants (all on the same model; only the balancing changes):
  loss_free          gamma = 1e-3, no auxiliary loss
  aux_loss           batch-wise auxiliary loss alpha = 1e-3, no bias (the paper's baseline)
  none               neither: routing collapses onto a few experts if nothing holds it back
  loss_free_seq_aux  gamma = 1e-3 + V3's sequence-wise loss, alpha = 1e-4 (DeepSeek-V3's recipe)
  capacity           GShard: capacity factor 1.25 with token dropping, plus the alpha = 1e-3 auxiliary loss
"""

from experiments.framework.presets import base_for
from experiments.framework.spec import Claim, Experiment

LOSS_FREE = {"train.bias_update_rate": 1e-3, "model.aux_loss_alpha": 0.0}
AUX_LOSS = {"train.bias_update_rate": 0.0, "model.aux_loss_alpha": 1e-3, "model.seq_aux": False}


def variants(scale, base):
  del scale, base
  return {
      "loss_free": LOSS_FREE,
      "aux_loss": AUX_LOSS,
      "none": {"train.bias_update_rate": 0.0, "model.aux_loss_alpha": 0.0},
      "loss_free_seq_aux": {"train.bias_update_rate": 1e-3, "model.aux_loss_alpha": 1e-4, "model.seq_aux": True},
      "capacity": AUX_LOSS | {"model.moe_dispatch": "capacity", "model.capacity_factor": 1.25},
  }


PAPER = "Loss-Free Balancing (arXiv 2408.15664) Table 2, 1B"

EXPERIMENT = Experiment(
    name="balancing",
    title="auxiliary-loss-free balancing vs an auxiliary loss, none, V3's combination and capacity dropping",
    base=lambda scale: base_for(scale, "lfb_1b"),
    variants=variants,
    claims=(
        Claim("loss-free balancing reaches a lower validation perplexity than the auxiliary loss", "bits_per_byte",
              "loss_free", "aux_loss", "lower", f"{PAPER}: PPL 9.56 -> 9.50"),
        Claim("loss-free balancing balances the experts far better than the auxiliary loss", "max_vio_global",
              "loss_free", "aux_loss", "lower", f"{PAPER}: MaxVio_global 0.72 -> 0.04"),
        Claim("loss-free balancing keeps every training batch better balanced than the auxiliary loss",
              "max_vio_batch", "loss_free", "aux_loss", "lower", f"{PAPER} Fig. 3: published as a curve only"),
        Claim("without any balancing the load is far less even than with loss-free balancing", "max_vio_global",
              "none", "loss_free", "higher", "implied by the paper's motivation (routing collapse); no figure"),
    ),
    metrics=("bits_per_byte", "eval_loss", "max_vio_global", "max_vio_batch", "tokens_per_sec"),
    charts=("bits_per_byte", "max_vio_global", "max_vio_batch"),
    curves=("ce", "max_vio"),
)
