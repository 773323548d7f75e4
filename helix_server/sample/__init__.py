"""Sampling: logits processors, the sampler (next tokens and logprobs) and seeded generators."""
