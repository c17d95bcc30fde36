"""`kvcore_hf`: lm-eval's `hf` model with a per-layer SVD-truncated KV cache in every forward and generation.

A narrow `HFLM` subclass (the pattern of lm-eval's `hf_steered`): it validates the truncation settings and
the artifact against the model before any weights load, then hands a fresh `LowRankCache` to
`_model_call` (loglikelihood, rolling perplexity: one forward) and `_model_generate` (generation).

    lm_eval --model kvcore_hf \
        --model_args pretrained=Qwen/Qwen3-4B,calibration=runs/qwen3-alpaca,key_rank=0.25 --tasks kvcore_alpaca
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from kvcore_eval.artifact import Calibration, load_calibration, read_metadata
from kvcore_eval.cache import LowRankCache, cache_bytes_per_token, layer_bases
from kvcore_eval.gram import KEY_SPACES
from kvcore_eval.models import config_fingerprint, kv_geometry, weights_fingerprint
from kvcore_eval.rank_plan import TruncationConfig, make_plan
from kvcore_eval.rope import find_rotary_embedding

logger = logging.getLogger(__name__)


def _model_config(pretrained: Any, revision: str | None):
    if not isinstance(pretrained, str):
        return pretrained.config
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(pretrained, revision=revision)


def check_artifact_matches(metadata: dict[str, Any], config, allow_mismatch: bool, artifact_path: str) -> None:
    """Refuse an artifact calibrated on another architecture; another model or revision only with allow_mismatch."""
    recorded = metadata["model"]
    if recorded["geometry"] != kv_geometry(config).to_dict():
        raise ValueError(
            f"artifact {artifact_path} was calibrated on {recorded['model_id']} with KV geometry {recorded['geometry']}, "
            f"this model has {kv_geometry(config).to_dict()}: calibrate this model with `kvcore-eval calibrate`"
        )
    if recorded["config_fingerprint"] != config_fingerprint(config):
        _mismatch(f"artifact {artifact_path} was calibrated on {recorded['model_id']} (config {recorded['config_fingerprint']}), "
                  f"not on this model's config ({config_fingerprint(config)})", allow_mismatch)


def _mismatch(message: str, allow_mismatch: bool) -> None:
    if not allow_mismatch:
        raise ValueError(message + ": calibrate this model, or pass allow_mismatch=true to use the artifact anyway")
    logger.warning("!" * 20 + " %s; allow_mismatch=true, going on " + "!" * 20, message)


@register_model("kvcore_hf")
class KVCoreHFLM(HFLM):
    """HFLM whose KV cache stores rank-r projections; every `hf` model_arg works, plus TruncationConfig's."""

    def __init__(self, calibration: str, key_rank=None, value_rank=None, rank_budget: float | None = None,
                 budget_method: str = "energy", key_space: str = "pre_rope", granularity: str = "layer",
                 truncate: str = "both", allow_mismatch: bool = False, **kwargs) -> None:
        self.kvcore_config = TruncationConfig(str(calibration), key_rank, value_rank, rank_budget, budget_method,
                                           key_space, granularity, truncate, bool(allow_mismatch))
        metadata = read_metadata(calibration)
        check_artifact_matches(metadata, _model_config(kwargs.get("pretrained"), kwargs.get("revision")), self.kvcore_config.allow_mismatch, str(calibration))
        artifact = load_calibration(calibration)
        if KEY_SPACES[key_space] not in artifact.eigenvalues:
            raise ValueError(f"artifact {calibration} has no {KEY_SPACES[key_space]} basis: re-run `kvcore-eval calibrate`, or pick another key_space")
        self.kvcore_plan = make_plan(self.kvcore_config, artifact)
        super().__init__(**kwargs)  # the weights load here, after every check that needs none
        if metadata["model"]["weights_fingerprint"] != weights_fingerprint(self.model):
            _mismatch(f"artifact {calibration} was calibrated on other weights ({metadata['model']['model_id']})", self.kvcore_config.allow_mismatch)
        self._setup_cache(artifact)

    def _setup_cache(self, artifact: Calibration) -> None:
        geometry = artifact.geometry
        self._bases = layer_bases(artifact, self.kvcore_plan, self.device)
        self._kv_heads = geometry.kv_heads
        self._rotary = find_rotary_embedding(self.model) if self.kvcore_config.key_space == "pre_rope" else None
        element_size = torch.empty(0, dtype=self.model.dtype).element_size()
        self.kvcore_cache_bytes = cache_bytes_per_token(self.kvcore_plan, geometry.kv_heads, geometry.num_layers, element_size,
                                                        has_rope=find_rotary_embedding(self.model) is not None)
        logger.info("kvcore_hf: key ranks %s, value ranks %s, cache %.1f%% of full (%d vs %d bytes/token)",
                    self.kvcore_plan.key_rank_per_layer, self.kvcore_plan.value_rank_per_layer, 100 * self.kvcore_cache_bytes["ratio"],
                    self.kvcore_cache_bytes["low_rank"], self.kvcore_cache_bytes["full"])

    def new_cache(self) -> LowRankCache:
        """A fresh, empty low-rank cache sharing this model's bases."""
        return LowRankCache(self._bases, self._kv_heads, self._rotary)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None or labels is not None:
            raise NotImplementedError("kvcore_hf supports decoder-only causal LMs")
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(inps, cache=self.new_cache(), use_cache=True).logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        return super()._model_generate(context, max_length, stop, cache=self.new_cache(), **generation_kwargs)

    def get_model_info(self) -> dict[str, Any]:
        """lm-eval copies this into the results JSON's `config`: the ranks used and the cache's bytes per token."""
        info = super().get_model_info()
        info["kvcore"] = {
            "calibration": self.kvcore_config.calibration,
            "truncation": {k: v for k, v in vars(self.kvcore_config).items() if k != "calibration"},
            "rank_plan": self.kvcore_plan.to_dict(),
            "cache_bytes_per_token": self.kvcore_cache_bytes,
        }
        return info
