"""Loading a Hugging Face causal LM, its KV geometry, and fingerprints that tie an artifact to it."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

# Config keys that say nothing about the weights' meaning (paths, versions, runtime choices).
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
    "_attn_implementation_autoset", "_commit_hash", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "architectures",
}


@dataclass(frozen=True)
class KVGeometry:
    """Shape of one layer's KV cache. `width` is D = kv_heads · head_dim, all KV heads concatenated."""

    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.kv_heads * self.head_dim

    def to_dict(self) -> dict[str, int]:
        return {"num_layers": self.num_layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim}


def kv_geometry(config: PretrainedConfig) -> KVGeometry:
    """KV geometry from a model config; a clear error for configs that do not describe attention heads."""
    text = config.get_text_config(decoder=True)
    num_heads = getattr(text, "num_attention_heads", None)
    num_layers = getattr(text, "num_hidden_layers", None)
    if not num_heads or not num_layers:
        raise ValueError(
            f"{type(config).__name__} has no num_attention_heads/num_hidden_layers: kvcore-eval needs a decoder "
            "with multi-head attention (Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2 style)."
        )
    kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    return KVGeometry(num_layers=int(num_layers), kv_heads=int(kv_heads), head_dim=int(head_dim))


def config_fingerprint(config: PretrainedConfig) -> str:
    """sha256 of the config's meaningful fields (architecture and sizes), independent of paths and versions."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, first 256 values and float64 sum: cheap, and changes with the weights."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            head = param.detach().flatten()[:256].to("cpu", torch.float64)
            digest.update(name.encode())
            digest.update(str(tuple(param.shape)).encode())
            digest.update(head.numpy().tobytes())
            digest.update(repr(round(param.detach().double().sum().item(), 6)).encode())
    return digest.hexdigest()[:16]


def model_identity(model: PreTrainedModel, model_id: str, revision: str | None) -> dict[str, Any]:
    """What the artifact records about the model: id, revision, geometry and both fingerprints."""
    config = model.config
    return {
        "model_id": model_id,
        "revision": revision or getattr(config, "_commit_hash", None),
        "model_type": config.model_type,
        "geometry": kv_geometry(config).to_dict(),
        "config_fingerprint": config_fingerprint(config),
        "weights_fingerprint": weights_fingerprint(model),
    }


def resolve_dtype(name: str) -> torch.dtype:
    import torch

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r} is not one of {sorted(dtypes)}")
    return dtypes[name]


def load_causal_lm(model_id: str, revision: str | None, device: str, dtype: str) -> PreTrainedModel:
    """Load a causal LM by hub id or local directory, in eval mode on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(model_id, revision=revision)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # fail before the weights load
        raise ValueError(
            f"{model_id} is a {config.model_type!r} model, not a causal LM transformers can load with "
            "AutoModelForCausalLM: pass a decoder-only LM (Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2, ...)"
        )
    kv_geometry(config)
    model = AutoModelForCausalLM.from_pretrained(model_id, revision=revision, dtype=resolve_dtype(dtype))
    return model.to(device).eval()


def load_tokenizer(model_id: str, revision: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_id, revision=revision)
