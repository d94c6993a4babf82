"""Training: RETRO (or the GPT baseline) with DeepSpeed inside Ray Train workers.

Modules: config.py (TrainConfig), loop.py (the per-worker loop), trainer.py (run()), export.py
(one-file model export), synthetic.py (a learnable synthetic dataset for tests and benchmarks).
"""
