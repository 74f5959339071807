"""Evaluation utilities: dependency-free caption metrics (BLEU-1..4, CIDEr-D) in `caption_metrics`."""
