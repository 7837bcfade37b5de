"""moe_jax experiments: the DeepSeek papers' ablations as rerunnable sweeps (see experiments/README.md).

    python -m experiments.run --list
    python -m experiments.run balancing --workdir=experiments/runs/balancing
    python -m experiments.report balancing --workdir=experiments/runs/balancing
"""
