"""LoRA adapters: validation, pinned host cache, GPU slots and asynchronous loads."""
