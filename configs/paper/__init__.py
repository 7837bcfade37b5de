"""The papers' own model and training configs, for `python -m experiments.run <name> --scale=paper`:
lfb_1b / lfb_3b (Loss-Free Balancing, arXiv 2408.15664) and deepseekmoe_2b (DeepSeekMoE, arXiv 2401.06066).
Data paths come from flags: --config.data.paths="('/data/corpus/*.jsonl',)"."""
