"""The loss-free bias update: its rate gamma and its rule.

Wang et al. 2024 (arXiv 2408.15664) sec. 4.3, 1B model: u = 1e-4 converges slowly, u = 1e-2 oscillates late in
training, u = 1e-3 was chosen; sign rule (u = 1e-3) 9.50 PPL / 0.044 MaxVio_global, proportional rule 9.53 / 0.028
(u = 1e-2), 9.51 / 0.036 (u = 1e-3), 9.51 / 0.040 (u = 1e-4). The proportional rule here moves each bias by the
load's violation relative to the mean (moe_jax.training.balancing), so its gamma is on the same scale as the sign
rule's. No auxiliary loss in any variant.
"""

from experiments.framework.presets import base_for
from experiments.framework.spec import Claim, Experiment

RATES = {"1e-4": 1e-4, "1e-3": 1e-3, "1e-2": 1e-2}


def variants(scale, base):
  del scale, base
  out = {}
  for rule in ("sign", "proportional"):
    for label, rate in RATES.items():
      out[f"{rule}_{label}"] = {"train.bias_update_rate": rate, "train.bias_update_rule": rule,
                                "model.aux_loss_alpha": 0.0}
  return out


PAPER = "Loss-Free Balancing (arXiv 2408.15664) sec. 4.3, 1B"

EXPERIMENT = Experiment(
    name="bias_update",
    title="loss-free balancing's bias update rate (1e-4, 1e-3, 1e-2) and rule (sign, proportional)",
    base=lambda scale: base_for(scale, "lfb_1b"),
    variants=variants,
    claims=(
        Claim("u = 1e-4 balances too slowly: worse MaxVio_batch than u = 1e-3", "max_vio_batch", "sign_1e-4",
              "sign_1e-3", "higher", f"{PAPER} Fig. 4: converges slowly (curve only)"),
        Claim("u = 1e-2 oscillates: worse global balance than u = 1e-3 late in training", "max_vio_global",
              "sign_1e-2", "sign_1e-3", "higher", f"{PAPER} Fig. 4: oscillates (curve only)"),
        Claim("proportional (u = 1e-3) balances slightly better than sign (u = 1e-3)", "max_vio_global",
              "proportional_1e-3", "sign_1e-3", "lower", f"{PAPER} Table 4: MaxVio_global 0.044 -> 0.036"),
        Claim("proportional (u = 1e-3) is not better in perplexity than sign (u = 1e-3)", "bits_per_byte",
              "proportional_1e-3", "sign_1e-3", "higher", f"{PAPER} Table 4: PPL 9.50 -> 9.51"),
    ),
    charts=("bits_per_byte", "max_vio_global", "max_vio_batch"),
    curves=("max_vio", "ce"),
)
