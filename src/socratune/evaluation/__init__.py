"""Layer 4, judging a trained run: base vs tuned vs checkpoints on held-out prompts, the LLM
judge, and the report's statistics and plots."""
