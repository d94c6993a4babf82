"""Training: RETRO (or the GPT baseline) with DeepSpeed inside Ray Train workers.

Modules: config.py (TrainConfig), loop.py (the per-worker loop), cpu_tuning.py (what the loop
applies on CPU workers: fast dropout masks, glibc's allocator, DeepSpeed's op table), trainer.py
(run()), export.py (one-file model export), synthetic.py (a learnable synthetic dataset for tests and
benchmarks).
"""
