"""Loading a Hugging Face causal LM, its KV geometry, and fingerprints that tie an artifact to it."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

# Config keys that say nothing about the architecture (paths, versions, runtime choices, how weights were
# stored: a loaded GGUF gains a quantization_config its bare config lacks; the weights fingerprint covers weights).
_VOLATILE_CONFIG_KEYS = {
    "quantization_config",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_commit_hash",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "architectures",
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


WEIGHT_SAMPLE = 64  # values sampled per parameter for the fingerprint
# Unit roundoff of each load dtype: loading one checkpoint in dtype a and in dtype b gives weights that differ by at
# most u_a + u_b relative to their size; in the same dtype they are equal, bit for bit.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
SUBNORMAL = 2.0**-24  # float16's smallest subnormal: the absolute error of values flushed near zero


_KEY_PROJECTIONS = ("k_proj", "qkv_proj", "query_key_value", "c_attn")  # own, Phi-3, GPT-NeoX, GPT-2


def layer_devices(model: torch.nn.Module) -> list[torch.device]:
    """Each decoder layer's device, read from the loaded model: where its attention's key projection weight lives
    (k_proj, or the fused projection that holds it), or where accelerate's hook runs it when that weight is offloaded
    (device_map with cpu/disk offload, parallelize=True). A model split by a device_map has its layers on several
    devices; each layer's bases and latents go where its keys are computed."""
    import torch

    from kvcore_eval.model.rope import attention_modules  # lazy: torch (config reads this module and stays light)

    devices = []
    for layer_idx, attention in attention_modules(model).items():
        projection = next((getattr(attention, n) for n in _KEY_PROJECTIONS if hasattr(attention, n)), attention)
        weight = next(projection.parameters(), None)
        hooked = next((m._hf_hook.execution_device for m in (projection, attention) if hasattr(m, "_hf_hook")), None)
        if weight is not None and (weight.device.type != "meta" or hooked is None):
            device = weight.device
        else:
            device = hooked
        if device is None:
            raise ValueError(f"layer {layer_idx}'s attention holds no key projection weight to place its bases by")
        devices.append(torch.device(device))
    return devices


def weights_sample(model: torch.nn.Module) -> torch.Tensor:
    """A strided sample of every parameter, in name order: (parameters, WEIGHT_SAMPLE) float32 on the CPU.
    Reads 64 values a parameter and moves them in one transfer: no full copy, no sync per parameter. Parameters that
    accelerate offloaded (device_map with cpu or disk offload: meta tensors in the model) are read from their offload,
    one offloaded module at a time."""
    import torch

    def sample(param: torch.Tensor) -> torch.Tensor:
        flat = param.detach().reshape(-1)
        index = torch.arange(WEIGHT_SAMPLE, device=flat.device) * (flat.numel() - 1) // (WEIGHT_SAMPLE - 1)  # int64
        return flat[index].float().cpu()

    with torch.no_grad():
        rows = dict(offloaded_parameters(model, sample))
        rows.update({name: sample(p) for name, p in model.named_parameters() if name not in rows})
    return torch.stack([rows[name] for name in sorted(rows)])


def offloaded_parameters(model: torch.nn.Module, read: Callable) -> list[tuple[str, Any]]:
    """(name, read(parameter)) of every parameter accelerate offloaded (a meta tensor in the model), each read while
    its module's hook has loaded the real weights onto the execution device (one module at a time)."""
    from accelerate.utils import align_module_device, has_offloaded_params

    found = []
    for prefix, module in model.named_modules():
        if has_offloaded_params(module):
            with align_module_device(module):
                found += [(f"{prefix}.{name}".lstrip("."), read(p)) for name, p in module.named_parameters()]
    return found


def weights_fingerprint(model: torch.nn.Module, sample: torch.Tensor | None = None) -> str:
    """sha256 of the parameters' names and shapes and of their sample rounded to bfloat16: equal for a model
    loaded in float32 or bfloat16 (both round the same way), different for other weights."""
    import torch

    sample = weights_sample(model) if sample is None else sample
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(f"{name}{tuple(param.shape)};".encode())
    digest.update(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def same_weights(recorded: torch.Tensor, current: torch.Tensor, recorded_dtype: str, current_dtype: str) -> bool:
    """Whether two weight samples come from one checkpoint: equal when both loads used one dtype, else within the
    rounding of the two dtypes (u_a + u_b relative, the coarser one's dominating)."""
    import torch

    if recorded.shape != current.shape:
        return False
    if recorded_dtype == current_dtype:
        return bool(torch.equal(recorded, current))
    tolerance = UNIT_ROUNDOFF[recorded_dtype] + UNIT_ROUNDOFF[current_dtype]
    scale = torch.maximum(recorded.abs(), current.abs())
    return bool(((recorded - current).abs() <= tolerance * scale + SUBNORMAL).all())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weights_digest(sample: torch.Tensor) -> str:
    """sha256 of a weight sample, bit for bit (the exact identity of weights loaded in one dtype)."""
    return hashlib.sha256(sample.float().numpy().tobytes()).hexdigest()[:16]


def gguf_location(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None): `path/to/model.gguf` is split into its folder and name."""
    from pathlib import Path

    if gguf_file is None and model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {model} does not exist: check the path")
        return str(path.parent), path.name
    return model, gguf_file


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(
    model: PreTrainedModel, model_id: str, revision: str | None, gguf_file: str | None = None
) -> dict[str, Any]:
    """What the artifact records about the model: id, revision, geometry, fingerprints and the GGUF file."""
    from pathlib import Path

    config = model.config
    identity = {
        "model_id": model_id,
        "revision": revision or getattr(config, "_commit_hash", None),
        "model_type": config.model_type,
        "geometry": kv_geometry(config).to_dict(),
        "config_fingerprint": config_fingerprint(config),
        "weights_fingerprint": weights_fingerprint(model),
    }
    if gguf_file is not None:
        local = Path(model_id) / gguf_file
        identity["gguf"] = {"file": gguf_file, "sha256": file_sha256(str(local)) if local.is_file() else None}
    return identity


def resolve_device(device: str) -> str:
    """`auto` as lm-eval's HFLM resolves a device it is not given: cuda when available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str) -> torch.dtype:
    import torch

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r} is not one of {sorted(dtypes)}")
    return dtypes[name]


def resolve_dtype_name(name: str, device: str, config: Callable[[], PretrainedConfig] | PretrainedConfig) -> str:
    """`--dtype` as a model loads: `auto` is the model's own dtype (its config's) on an accelerator, as lm-eval's `hf`
    reads `dtype=auto`, and float32 on the CPU, where bfloat16 and float16 matmuls are slow; a checkpoint without a
    dtype, or with one kvcore-eval does not load (float64, ...), is float32. `config`: the model's config, or what
    gives it (read only when needed)."""
    if name != "auto":
        resolve_dtype(name)  # a clear error for a name it is not
        return name
    if resolve_device(device).startswith("cpu"):
        return "float32"
    config = config() if callable(config) else config
    own = getattr(config.get_text_config(decoder=True), "dtype", None) or getattr(config, "dtype", None)
    own = own if isinstance(own, str) else dtype_name(own) if own is not None else "float32"
    return own if own in ("float32", "float16", "bfloat16") else "float32"


def load_config(model_id: str, revision: str | None, gguf_file: str | None = None) -> PretrainedConfig:
    """The model's config; a clear error for a path that is neither a model folder nor a hub id."""
    from pathlib import Path

    from transformers import AutoConfig

    local = Path(model_id)
    # A hub id is `name` or `org/name`; a trailing slash, a leading . or /, or more parts can only be a path.
    looks_local = local.is_absolute() or model_id.startswith(".") or model_id.endswith("/") or model_id.count("/") > 1
    if (looks_local or local.exists()) and not local.is_dir():
        raise FileNotFoundError(
            f"model folder {model_id} does not exist: pass a folder holding config.json, a .gguf file, or a hub id"
        )
    return AutoConfig.from_pretrained(model_id, revision=revision, gguf_file=gguf_file)


def load_causal_lm(
    model_id: str, revision: str | None, device: str, dtype: str, gguf_file: str | None = None
) -> PreTrainedModel:
    """Load a causal LM by hub id, local directory or GGUF file (dequantized), in eval mode on `device`, in `dtype`
    (`auto`: `resolve_dtype_name`; the model's `dtype` says what it resolved to)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = load_config(model_id, revision, gguf_file)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # fail before the weights load
        raise ValueError(
            f"{model_id} is a {config.model_type!r} model, not a causal LM transformers can load with "
            "AutoModelForCausalLM: pass a decoder-only LM (Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2, ...)"
        )
    kv_geometry(config)
    model = AutoModelForCausalLM.from_pretrained(  # config=: a GGUF's metadata is parsed once for it, not twice
        model_id,
        config=config,
        revision=revision,
        dtype=resolve_dtype(resolve_dtype_name(dtype, device, config)),
        gguf_file=gguf_file,
    )
    return model.to(device).eval()


def load_tokenizer(model_id: str, revision: str | None, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_id, revision=revision, gguf_file=gguf_file)


def context_length(config: PretrainedConfig, tokenizer) -> int:
    """The context lm-eval's HFLM gives the model (its max_length): from the config (n_positions,
    max_position_embeddings, n_ctx), else the tokenizer, else lm-eval's default. Readable before the weights load."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import resolve_max_length

    return resolve_max_length(config, tokenizer, default=HFLM._DEFAULT_MAX_LENGTH)
