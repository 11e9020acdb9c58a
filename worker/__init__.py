"""The GPU worker: model, paged KV cache, LoRA slots, pinned host cache and async loads."""
