"""Evaluation: perplexity over token windows and lm-eval zero-shot tasks from locally cached data."""
