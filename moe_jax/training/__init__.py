"""Training: the V3 objective, optimiser and schedules, loss-free balancing, checkpoints, the loop."""

from moe_jax.training.config import base_checkpoint_config, base_data_config, base_train_config, validate_config
from moe_jax.training.trainer import TrainingDiverged, train_and_evaluate
