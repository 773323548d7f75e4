"""Our own torch implementations of Llama-family models, their registry and the safetensors loader."""

from helix_server.models.hf_config import ArchConfig
from helix_server.models.loader import load_hf_config, load_model, open_gguf
from helix_server.models.registry import MODEL_REGISTRY

__all__ = ["MODEL_REGISTRY", "ArchConfig", "load_hf_config", "load_model", "open_gguf"]
