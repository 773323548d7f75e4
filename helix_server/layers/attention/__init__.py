"""Paged attention: metadata, the portable backend, and the layer models call."""

from helix_server.layers.attention.layer import Attention
from helix_server.layers.attention.metadata import AttentionMetadata, ForwardContext, PrefillChunk

__all__ = ["Attention", "AttentionMetadata", "ForwardContext", "PrefillChunk"]
