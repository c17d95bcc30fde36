"""kvcore-eval: KV-cache Compressibility by Rank Evaluation (KV-CoRE), as an lm-evaluation-harness extension.

Data flows one way: dataset -> calibrate (Grams, float64) -> artifact on disk -> rank plan -> low-rank cache
-> lm-eval (`--model kvcore_hf`) -> report. Importing this package loads nothing heavy.
"""

__version__ = "0.1.0"
