"""Inference: prompt building, KV-cache generation, streaming. No Ray Serve here."""
