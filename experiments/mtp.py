"""Multi-token prediction depth 0 / 1 / 2 at equal main-model size.

DeepSeek-V3 report (arXiv 2412.19437) sec. 2.2 and Table 4: one MTP module (depth 1, loss weight lambda = 0.3)
keeps Pile bits/byte equal or better (small .729 -> .729, large .658 -> .657) and lifts HumanEval and GSM8K; the
MTP modules are discarded at inference, so the inference cost is equal. Used for speculative decoding, the
second token is accepted 85-90% of the time (sec. 5.4.3). Here: the main head's held-out bits per byte (the MTP
modules never score it) and, for depth >= 1, greedy speculative acceptance on held-out prompts.
"""

from experiments.framework.presets import base_for
from experiments.framework.spec import Claim, Experiment


def variants(scale, base):
  del scale, base
  return {f"depth{j}": {"model.num_nextn_predict_layers": j, "train.mtp_weight": 0.3} for j in (0, 1, 2)}


PAPER = "DeepSeek-V3 (arXiv 2412.19437)"

EXPERIMENT = Experiment(
    name="mtp",
    title="multi-token prediction depth 0 / 1 / 2: main-head quality and speculative acceptance",
    base=lambda scale: base_for(scale, "lfb_1b"),
    variants=variants,
    claims=(
        Claim("one MTP module does not hurt (and may help) the main head's held-out bits per byte", "bits_per_byte",
              "depth1", "depth0", "lower", f"{PAPER} Table 4: Pile BPB .729 -> .729 (small), .658 -> .657 (large)"),
        Claim("a second MTP module does not hurt the main head either", "bits_per_byte", "depth2", "depth0", "lower",
              "not ablated by the paper (V3 trains depth 1)"),
        Claim("the MTP module's drafts are accepted 85-90% of the time", "acceptance_rate", "depth1", None, "within",
              f"{PAPER} sec. 5.4.3: second-token acceptance 85-90%", band=(0.85, 0.90)),
    ),
    metrics=("bits_per_byte", "eval_loss", "acceptance_rate", "tokens_per_step", "max_vio_global", "tokens_per_sec"),
    charts=("bits_per_byte", "acceptance_rate"),
    curves=("ce", "mtp_loss"),
    mtp_acceptance=True,
)
