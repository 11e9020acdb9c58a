"""The gRPC frontend process: public API, tokenizer, detokenizer, stop strings, streaming."""
