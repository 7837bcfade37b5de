"""FFN architecture at equal activated parameters: dense, GShard top-2, DeepSeekMoE, DeepSeekMoE without the
shared expert.

Dai et al. 2024, "DeepSeekMoE" (arXiv 2401.06066), Table 1 (2B, Pile loss): dense 2.060, GShard 1.867,
DeepSeekMoE (1 shared + 63 routed, 7 activated) 1.808; sec. 4.4: disabling the shared expert (one more routed
expert activated instead) 1.808 -> 2.414. As in the paper every FFN activates the same width: with F the width of
one "standard" FFN (here 2 x hidden), GShard routes each token to 2 of 16 experts of width F; DeepSeekMoE splits
each expert into 4 (width F/4) and activates 1 shared + 7 of 63 routed; without the shared expert, 8 of 64 routed;
the dense model has one FFN of width 2F (CPU: F = 2 x hidden = 256; paper scale: the 2B model's F = 3,456). Routing is the paper's: softmax affinities, plain top-K, weights not
renormalised, the expert-level balance loss with alpha = 0.01 (batch-wise); no routing bias. The first layer is
dense (width 2F) in every variant at CPU scale, as the base model's; the paper's 2B model has none.
"""

from experiments.framework.presets import base_for
from experiments.framework.spec import Claim, Experiment

ROUTING = {"model.scoring_func": "softmax", "model.topk_method": "greedy", "model.norm_topk_prob": False,
           "model.routed_scaling_factor": 1.0, "model.aux_loss_alpha": 0.01, "model.seq_aux": False,
           "model.n_group": 1, "model.topk_group": 1, "train.bias_update_rate": 0.0}


def variants(scale, base):
  # one standard FFN's width: 2 x hidden on CPU; the paper's model has 4 experts per standard FFN
  F = 2 * base.model.hidden_size if scale == "cpu" else 4 * base.model.moe_intermediate_size
  return {
      "dense": {"model.first_k_dense_replace": base.model.num_hidden_layers, "model.intermediate_size": 2 * F,
                "train.bias_update_rate": 0.0},
      "gshard": ROUTING | {"model.n_routed_experts": 16, "model.num_experts_per_tok": 2,
                           "model.moe_intermediate_size": F, "model.n_shared_experts": 0},
      "deepseekmoe": ROUTING | {"model.n_routed_experts": 63, "model.num_experts_per_tok": 7,
                                "model.moe_intermediate_size": F // 4, "model.n_shared_experts": 1},
      "no_shared": ROUTING | {"model.n_routed_experts": 64, "model.num_experts_per_tok": 8,
                              "model.moe_intermediate_size": F // 4, "model.n_shared_experts": 0},
  }


PAPER = "DeepSeekMoE (arXiv 2401.06066)"

EXPERIMENT = Experiment(
    name="moe_architecture",
    title="dense vs GShard top-2 vs DeepSeekMoE (fine-grained + shared) vs no shared expert, equal activated width",
    base=lambda scale: base_for(scale, "deepseekmoe_2b"),
    variants=variants,
    claims=(
        Claim("GShard MoE beats the dense model of equal activated size", "bits_per_byte", "gshard", "dense", "lower",
              f"{PAPER} Table 1: Pile loss 2.060 -> 1.867"),
        Claim("DeepSeekMoE beats GShard at equal activated and total size", "bits_per_byte", "deepseekmoe", "gshard",
              "lower", f"{PAPER} Table 1: Pile loss 1.867 -> 1.808"),
        Claim("removing the shared expert hurts", "bits_per_byte", "no_shared", "deepseekmoe", "higher",
              f"{PAPER} sec. 4.4: Pile loss 1.808 -> 2.414"),
    ),
    metrics=("bits_per_byte", "eval_loss", "max_vio_global", "active_params", "total_params", "tokens_per_sec"),
    charts=("bits_per_byte", "max_vio_global"),
    curves=("ce", "max_vio"),
)
