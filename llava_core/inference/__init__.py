"""Generation with a LLaVA export, below its two users: the endpoint (`serve/`) and evaluation (`eval/`). The engine
batches requests of any family through transformers, a per-request sampler keeps each request's own decoding
settings, and the answer stream turns tokens into text deltas with stop strings."""
