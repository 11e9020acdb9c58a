"""The scheduler: policy only (queues, KV pages, adapter state machine); no torch."""
