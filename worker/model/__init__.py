"""Llama-family causal LMs over a ragged batch and a paged KV cache."""
