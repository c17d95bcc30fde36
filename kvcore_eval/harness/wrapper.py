"""`kvcore_hf`: lm-eval's `hf` model with a per-layer SVD-truncated KV cache in every forward and generation.

A narrow `HFLM` subclass (the pattern of lm-eval's `hf_steered`): it validates the truncation settings and
the artifact against the model before any weights load, then hands a fresh `LowRankCache` to
`_model_call` (loglikelihood, rolling perplexity: one forward) and `_model_generate` (generation).

    lm_eval --model kvcore_hf \
        --model_args pretrained=Qwen/Qwen3-4B,calibration=runs/qwen3-alpaca,key_rank=0.25 --tasks kvcore_alpaca
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from kvcore_eval.calibration.artifact import Calibration, load_calibration, read_metadata
from kvcore_eval.calibration.overlap import OverlapCounter
from kvcore_eval.compression import bases, latent, peers
from kvcore_eval.compression.cache import (
    LowRankCache,
    cache_bytes_per_token,
    compare_with_model_cache,
    layer_bases,
    sliding_window_layers,
)
from kvcore_eval.compression.methods import BASES, check_batch_size
from kvcore_eval.compression.quantize import Codec
from kvcore_eval.compression.rank_plan import make_plan
from kvcore_eval.config import TruncationConfig, split_options
from kvcore_eval.harness.lm_tasks import quiet_lm_eval_warnings
from kvcore_eval.harness.measured import CacheMeasures, all_processes
from kvcore_eval.model.models import (
    config_fingerprint,
    dtype_name,
    kv_geometry,
    layer_devices,
    load_config,
    same_weights,
    weights_fingerprint,
    weights_sample,
)
from kvcore_eval.model.rope import RopeTap
from kvcore_eval.model.selfcheck import check_key_recovery
from kvcore_eval.spaces import KEY_SPACES

# A child of lm-eval's logger: plain `lm_eval` shows it.
logger = logging.getLogger("lm_eval.models.kvcore_hf")


def _model_config(pretrained: Any, revision: str | None, gguf_file: str | None):
    if not isinstance(pretrained, str):
        return pretrained.config
    return load_config(pretrained, revision, gguf_file)


def _checked_artifact(truncation: TruncationConfig, model_config) -> Calibration:
    """The artifact of a truncation config, checked against the model's config before use."""
    metadata = read_metadata(truncation.calibration)
    check_artifact_matches(metadata, model_config, truncation.allow_mismatch, truncation.calibration)
    artifact = load_calibration(truncation.calibration, eigenvectors=False)  # bases are read as the plan's slices
    if KEY_SPACES[truncation.key_space] not in artifact.eigenvalues:
        raise ValueError(
            f"artifact {truncation.calibration} has no {KEY_SPACES[truncation.key_space]} basis: re-run "
            "`kvcore-eval calibrate`, or pick another key_space"
        )
    return artifact


def check_artifact_matches(metadata: dict[str, Any], config, allow_mismatch: bool, artifact_path: str) -> None:
    """Refuse an artifact calibrated on another architecture; another model or revision only with allow_mismatch."""
    recorded = metadata["model"]
    if recorded["geometry"] != kv_geometry(config).to_dict():
        raise ValueError(
            f"artifact {artifact_path} was calibrated on {recorded['model_id']} with KV geometry "
            f"{recorded['geometry']}, this model has {kv_geometry(config).to_dict()}: "
            "calibrate this model with `kvcore-eval calibrate`"
        )
    if recorded["config_fingerprint"] != config_fingerprint(config):
        _mismatch(
            f"artifact {artifact_path} was calibrated on {recorded['model_id']} "
            f"(config {recorded['config_fingerprint']}), not on this model's config ({config_fingerprint(config)})",
            allow_mismatch,
        )


def _mismatch(message: str, allow_mismatch: bool) -> None:
    if not allow_mismatch:
        raise ValueError(message + ": calibrate this model, or pass allow_mismatch=true to use the artifact anyway")
    logger.warning("!" * 20 + " %s; allow_mismatch=true, going on " + "!" * 20, message)


def _basis_source(truncation: TruncationConfig, model_config, seeded: dict[tuple, Calibration]) -> Calibration:
    """What a plan is made against before the weights load: the checked artifact (calibrated bases), seeded bases
    (random, rotation), or a flat spectrum standing in for bases that need the weights or the sequence (or none).
    Seeded bases are built once per (source, seed, geometry) and kept in `seeded` (one model's: every frontier probe
    and sweep point of that source reuses them; an 8B shape's random bases take 20 s and 0.4 GiB to build)."""
    source = BASES[truncation.basis]
    if source.calibrated:
        return _checked_artifact(truncation, model_config)
    geometry = kv_geometry(model_config)
    if source.seeded is not None:
        key = (source.seeded, int(truncation.basis_seed), geometry)
        if key not in seeded:
            seeded[key] = getattr(bases, source.seeded)(geometry, truncation.basis_seed)
        return seeded[key]
    return bases.flat_spectrum(geometry, truncation.basis)


def _cpu_processes_under_a_launcher(environment) -> None:
    """Several processes started by torchrun (or `accelerate launch --multi_gpu`) on a machine without CUDA: tell
    accelerate they are CPU processes (ACCELERATE_USE_CPU, what `accelerate launch --cpu` sets), else the Accelerator
    lm-eval builds sees one process in each and they never meet (gloo)."""
    several = int(environment.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in environment
    if several and not torch.cuda.is_available():
        environment["ACCELERATE_USE_CPU"] = "true"


_HFLM_OPTIONS = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


@register_model("kvcore_hf")
class KVCoreHFLM(HFLM):
    """HFLM whose KV cache stores rank-r projections; every `hf` model_arg works, plus TruncationConfig's."""

    def __init__(self, **kwargs) -> None:
        """Every `hf` model_arg, plus `TruncationConfig`'s fields by name (the one declaration of each option).
        Options are checked against the artifact before any weights load; an error is logged first, so that it
        is the first thing a user of plain `lm_eval` sees, then raised."""
        try:
            options, hf_options = split_options(TruncationConfig, kwargs, others=_HFLM_OPTIONS)
            truncation = TruncationConfig(**options)
            truncation.check_runnable()
            check_batch_size(truncation, hf_options.get("batch_size", 1))
            model_config = _model_config(
                hf_options.get("pretrained"), hf_options.get("revision"), hf_options.get("gguf_file")
            )
            self._seeded_bases: dict[tuple, Calibration] = {}  # random and rotation bases, by source, seed, shape
            source = _basis_source(truncation, model_config, self._seeded_bases)
            if truncation.bits is None:  # rank errors before any weights load (a budget in bits needs the dtype)
                make_plan(truncation, source)
        except (ValueError, OSError) as err:
            logger.error("kvcore_hf: %s", err)
            raise
        quiet_lm_eval_warnings()
        _cpu_processes_under_a_launcher(os.environ)
        super().__init__(**hf_options)  # the weights load here, after every check that needs none
        self._tap = RopeTap(self.model)  # stays on the model: records the rotary tables of every forward
        self._keys_checked = False
        self._weight_bases: dict[bool, Calibration] = {}  # by whether keys are truncated
        self._attention_implementation = self.model.config._attn_implementation  # what the reconstruction path uses
        self.kvcore_measure_error = False  # set by the frontier: caches keep the squared error of what they store
        self._context_lengths: dict[tuple[int, ...], int] = {}  # after_prefill: where each request's context ends
        self._apply(truncation, source)
        self._split_over_processes()

    def _split_over_processes(self) -> None:
        """Under `accelerate launch` with several processes, lm-eval's HFLM splits the requests by rank only where it
        sees more than one GPU; elsewhere (CPU processes, one GPU visible to each) every process would score every
        request. kvcore_hf splits them there too, through lm-eval's own data-parallel path (requests by rank, results
        gathered to rank 0; gloo on the CPU)."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes  # global: several nodes
        if self._world_size > 1:
            logger.info("kvcore_hf: process %d of %d, loaded %s", self._rank, self._world_size, self.kvcore_config)

    def set_truncation(self, truncation: TruncationConfig) -> None:
        """Swap the rank plan (and its bases) of the loaded model: many sweep points, one model load. The measured
        bytes start again from zero."""
        truncation.check_runnable()
        self._apply(truncation, _basis_source(truncation, self.model.config, self._seeded_bases))

    def _apply(self, truncation: TruncationConfig, source: Calibration) -> None:
        check_batch_size(truncation, self.batch_size)
        kind = BASES[truncation.basis]
        self.kvcore_config = truncation
        # data-free bases saw no document: nothing of a task can be in-sample
        self._overlap = OverlapCounter(source.document_digests if kind.calibrated else _NO_DOCUMENTS)
        self._artifact_metadata = source.metadata if kind.calibrated else None
        if kind.calibrated:
            self._check_weights(source)
        if self._rotates_keys(truncation):
            self._check_keys()
        if kind.from_weights:  # the SVD of the projection weights, checked on the model
            truncates_keys = truncation.truncates_keys
            if truncates_keys not in self._weight_bases:
                self._weight_bases[truncates_keys] = bases.weight_bases(self.model, self._tap, truncates_keys)
            source = self._weight_bases[truncates_keys]
        self._codec = Codec(truncation.latent_bits, self.model.dtype, truncation.scheme)
        self.kvcore_plan = make_plan(truncation, source, self._bytes_per_token)
        self._setup_cache(source)
        self._measured = CacheMeasures()  # every process's caches, pooled at the end of each request method
        self._pending = CacheMeasures()  # this process's caches since they were last pooled

    def _rotates_keys(self, truncation: TruncationConfig) -> bool:
        """Whether the cache undoes and redoes RoPE: pre-RoPE keys projected on a basis of a RoPE model."""
        kind = BASES[truncation.basis]
        return (
            truncation.key_space == "pre_rope"
            and truncation.truncates_keys
            and self._tap.has_rope
            and kind.projects
            and not kind.whole
        )

    def _check_keys(self) -> None:
        if not self._keys_checked:
            check_key_recovery(self.model, self._tap)  # also leaves this forward's tables in the tap
            self._keys_checked = True

    def _rope_bytes(self, plan) -> dict[str, float]:
        """Bytes per token of what rotates the cached pre-RoPE keys at read time, once per rotary group of the layers
        whose keys are projected: the positions (int32) where the model's rotary module recomputes the tables exactly
        (`RopeTap.recomputable`), else the tables themselves (cos and sin). Read from the last forward's tap (the
        key self-check's probe)."""
        if not self._rotates_keys(self.kvcore_config):
            return {}
        projected = [
            layer
            for layer, rank in enumerate(plan.key_rank_per_layer or [])
            if rank < plan.width or plan.bits("key", layer) is not None
        ]
        parts = {"rope_tables": 0.0, "rope_positions": 0.0}
        for group in {self._tap.group_of(layer) for layer in projected}:
            if self._tap.recomputable(group):
                parts["rope_positions"] += torch.empty(0, dtype=torch.int32).element_size()
            else:
                cos = self._tap.tables(group).cos
                parts["rope_tables"] += 2 * cos.shape[-1] * cos.element_size()
        return parts

    def _bytes_per_token(self, plan) -> dict[str, float]:
        geometry = kv_geometry(self.model.config)
        element_size = torch.empty(0, dtype=self.model.dtype).element_size()
        whole = BASES[self.kvcore_config.basis].whole
        return cache_bytes_per_token(
            plan, geometry.kv_heads, geometry.num_layers, element_size, self._rope_bytes(plan), self._codec, whole
        )

    def _check_weights(self, artifact: Calibration) -> None:
        """Same weights as the calibration: bit for bit in the same dtype, within the two dtypes' rounding across
        dtypes; else refuse (or warn)."""
        recorded = artifact.metadata["model"]
        sample = weights_sample(self.model)
        calibrated, loaded = artifact.metadata.get("model_dtype"), dtype_name(self.model.dtype)
        if artifact.weights_sample is None:  # an artifact without a sample: only the bfloat16-rounded fingerprint
            if recorded["weights_fingerprint"] == weights_fingerprint(self.model, sample):
                return
        elif same_weights(artifact.weights_sample, sample, calibrated, loaded):
            if calibrated != loaded:
                logger.info(
                    "kvcore_hf: same weights as the calibration, loaded as %s (calibrated as %s)", loaded, calibrated
                )
            return
        _mismatch(
            f"artifact {self.kvcore_config.calibration} was calibrated on other weights ({recorded['model_id']}, "
            f"{artifact.metadata.get('model_dtype')}) than this model ({self.model.dtype})",
            self.kvcore_config.allow_mismatch,
        )

    def _setup_cache(self, source: Calibration) -> None:
        geometry = source.geometry
        plan = self.kvcore_plan
        # each layer's bases on its own layer's device (a device_map or parallelize=True spreads the layers)
        kind = BASES[self.kvcore_config.basis]
        self._bases = layer_bases(
            source,
            plan,
            layer_devices(self.model),
            sequence=kind.per_sequence,
            whole=kind.whole,
            model_dtype=self.model.dtype,
            scheme=self.kvcore_config.scheme,
        )
        self._kv_heads = geometry.kv_heads
        truncates_keys = any(layer_bases.truncates("key") for layer_bases in self._bases)
        # only projected pre-RoPE keys of a RoPE model undo and redo RoPE
        self._cache_tap = self._tap if truncates_keys and self._rotates_keys(self.kvcore_config) else None
        self.kvcore_cache_bytes = self._bytes_per_token(plan)
        self.kvcore_model_cache = compare_with_model_cache(
            self.kvcore_cache_bytes, sliding_window_layers(self.model.config), geometry.num_layers
        )
        config = self.kvcore_config
        if config.peer is not None:  # transformers' own cache: what it holds is measured, not planned
            peers.check_geometry(config.peer, geometry)
            self.kvcore_cache_bytes = {**self.kvcore_cache_bytes, "low_rank": None, "ratio": None}
            self.kvcore_model_cache = None
            logger.info(
                "kvcore_hf: transformers' QuantizedCache (%s, %d bits, the last %d tokens in full precision), "
                "protocol=%s; its bytes are measured from what it holds",
                config.peer,
                config.latent_bits,
                config.residual_length,
                config.protocol,
            )
        else:
            logger.info(
                "kvcore_hf: basis=%s, %s key ranks %s, value ranks %s of %d%s, protocol=%s; cache %.1f%% of a full "
                "cache (%d vs %d bytes/token)",
                config.basis,
                plan.key_space,
                _ranks(plan.key_rank_per_layer),
                _ranks(plan.value_rank_per_layer),
                plan.width,
                _bits(config, plan),
                config.protocol,
                100 * self.kvcore_cache_bytes["ratio"],
                self.kvcore_cache_bytes["low_rank"],
                self.kvcore_cache_bytes["full"],
            )
        if self.kvcore_model_cache is not None:
            logger.warning("kvcore_hf: %s", self.kvcore_model_cache["note"])
        self._latent = self.kvcore_config.attention == "latent"
        if self._latent:
            latent.register()
            error = latent.check_against_reconstruction(
                self.model, lambda is_latent: self._cache(is_latent), self._attention_implementation
            )
            logger.info(
                "kvcore_hf: latent attention (reads the rank-r latents); agrees with reconstruction to %.1e", error
            )
        self.model.set_attn_implementation(latent.NAME if self._latent else self._attention_implementation)

    def _cache(self, is_latent: bool):
        config = self.kvcore_config
        if config.peer is not None:
            return peers.peer_cache(config.peer, self.model.config, config.latent_bits, config.residual_length)
        return LowRankCache(
            self._bases,
            self._kv_heads,
            self._cache_tap,
            latent=is_latent,
            codec=self._codec,
            measure_error=self.kvcore_measure_error,
            exact_current=config.protocol == "after_prefill",
        )

    def held_bytes(self, cache) -> dict[str, int]:
        """What a cache of this plan holds, by part (a low-rank cache's latents, codes, scales, positions...; a peer's
        quantized states and residual window)."""
        return peers.stored_bytes(cache) if self.kvcore_config.peer is not None else cache.stored_bytes()

    def _measure(self, cache, rows: int) -> None:
        """Add what one cache held at its end to the evaluation's measured bytes (and, when measured, the squared
        error of what entered it); `rows`: the batch it served."""
        errors = {"key": [], "value": []}
        if self.kvcore_measure_error and isinstance(cache, LowRankCache):
            errors = cache.squared_errors()
        # padding included, as a full cache holds it
        self._pending.add(CacheMeasures(self.held_bytes(cache), rows * cache.get_seq_length(), 1, errors))

    def _pool(self) -> None:
        """Add every process's pending measures to the evaluation's (all processes call this in step)."""
        for measures in all_processes(self._pending, self.world_size):
            self._measured.add(measures)
        self._pending = CacheMeasures()

    def kvcore_relative_errors(self) -> dict[str, list[float | None]] | None:
        """Per kind, per layer: the relative squared error ‖x − x̂‖² / ‖x‖² of every key (in the space the plan codes
        it: pre-RoPE keys before their rotation) and value that entered the caches since the last plan, as read back;
        None unless `kvcore_measure_error` was set before they were made."""
        if self.world_size <= 1:
            self._pool()
        return self._measured.relative_errors() if self.kvcore_measure_error else None

    def kvcore_measured_bytes(self) -> dict[str, Any] | None:
        """Bytes per token measured over every cache this evaluation created (since the last plan), in every process:
        what the caches held at their end (latents or codes, scales, rotary tables, per-sequence bases, in their
        stored dtypes) divided by the token positions they held, against a full cache in the model's dtype. None
        before any."""
        if self.world_size <= 1:
            self._pool()
        return self._measured.per_token(self.kvcore_cache_bytes["full"])

    def new_cache(self) -> LowRankCache:
        """A fresh, empty low-rank cache sharing this model's bases."""
        return self._cache(self._latent)

    def _count_overlap(self, requests) -> None:
        """Before any request runs: the fraction of each task's scored documents the calibration saw (over every
        process's share, so that all decide alike); a loud warning above 0, or a refusal with overlap=refuse."""
        tasks = set(self._overlap.add(requests))
        if self.world_size > 1:
            shares = all_processes((self._overlap.documents, tasks), self.world_size)
            for documents, _ in shares:
                self._overlap.merge(documents)
            tasks = set().union(*(named for _, named in shares))
        summary = self._overlap.summary()
        for task, counts in ((task, summary[task]) for task in sorted(tasks)):
            if counts["fraction"] is None:
                logger.warning(
                    "kvcore_hf: %s records no document digests (calibrated by an older kvcore-eval): overlap with "
                    "%s unknown",
                    self.kvcore_config.calibration,
                    task,
                )
            elif counts["fraction"] > 0:
                message = (
                    f"{counts['seen']} of the {counts['scored']} documents of {task} scored so far were in the "
                    f"calibration {self.kvcore_config.calibration}: its ND-PPL is in-sample (optimistic)"
                )
                if self.kvcore_config.overlap == "refuse":
                    raise ValueError(
                        message + ". Calibrate on documents the task does not score (e.g. --dataset "
                        f"lm_eval:{task} --skip-docs N with --limit N), or pass --allow-overlap"
                    )
                logger.warning("!" * 20 + " kvcore_hf: %s " + "!" * 20, message)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._count_overlap(requests)
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self._pool()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._count_overlap(requests)
        results = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        self._pool()
        return results

    def generate_until(self, requests, disable_tqdm: bool = False):
        self._count_overlap(requests)
        results = super().generate_until(requests, disable_tqdm=disable_tqdm)
        self._pool()
        return results

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attn_mask is not None or labels is not None:
            raise NotImplementedError("kvcore_hf supports decoder-only causal LMs")
        check_batch_size(self.kvcore_config, inps.shape[0])
        cache = self.new_cache()
        with (
            torch.no_grad(),
            latent.active(cache),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            logits = torch.cat(
                [
                    self.model(inps[:, start:stop], cache=cache, use_cache=True).logits
                    for start, stop in self._chunks(inps)
                ],
                dim=1,
            )
        self._measure(cache, inps.shape[0])
        return logits

    def _chunks(self, inps: torch.Tensor) -> list[tuple[int, int]]:
        """The forwards one input is fed in: one (protocol=forward); under after_prefill, the request's context, then
        its continuation, each cut every prefill_chunk tokens. An input of no known request is cut by prefill_chunk
        alone."""
        length = inps.shape[1]
        if self.kvcore_config.protocol == "forward":
            return [(0, length)]
        cuts = {0, length, self._context_lengths.get(tuple(inps[0].tolist()), 0)}
        if (chunk := self.kvcore_config.prefill_chunk) is not None:
            cuts.update(range(0, length, chunk))
        cuts = sorted(cut for cut in cuts if 0 <= cut <= length)
        return list(zip(cuts[:-1], cuts[1:], strict=True))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """Under after_prefill, each request's input as lm-eval builds it (context and continuation, the last token
        dropped, cut from the left to max_length) is remembered with where its context ends in it, so that
        `_model_call` can prefill the context before the continuation reads the compressed cache."""
        if self.kvcore_config.protocol == "after_prefill":
            self._context_lengths = {}
            for _, context, continuation in requests:
                tokens = (context + continuation)[-(self.max_length + 1) :][:-1]
                # the first continuation token is predicted by the context's last: the context is the first forward
                self._context_lengths[tuple(tokens)] = len(tokens) - len(continuation) + 1
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs
    ) -> torch.Tensor:
        cache = self.new_cache()
        if isinstance(cache, LowRankCache):  # a per-sequence basis keeps padding out of its bases
            cache.set_token_mask(generation_kwargs.get("attention_mask"))
        with latent.active(cache):
            output = super()._model_generate(context, max_length, stop, cache=cache, **generation_kwargs)
        check_cache_kept(cache, output, self.model.config)
        self._measure(cache, context.shape[0])
        return output

    def get_model_info(self) -> dict[str, Any]:
        """lm-eval copies this into the results JSON's `config`: the ranks used and the cache's bytes per token."""
        info = super().get_model_info()
        info["kvcore"] = {
            "calibration": self.kvcore_config.calibration,
            "artifact": describe_artifact(self._artifact_metadata),
            "truncation": {k: v for k, v in vars(self.kvcore_config).items() if k != "calibration"},
            "rank_plan": self.kvcore_plan.to_dict(),
            "cache_bytes_per_token": self.kvcore_cache_bytes,
            "measured_cache_bytes_per_token": self.kvcore_measured_bytes(),
            "model_cache_comparison": self.kvcore_model_cache,
            "calibration_overlap": self._overlap.summary(),
        }
        return info


def describe_artifact(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """What names an artifact in the results, wherever the folder moves: checksum, model, data, tokens (None for a
    data-free basis, which reads no artifact)."""
    if metadata is None:
        return None
    model = metadata["model"]
    return {
        "basis_sha256": metadata.get("basis_sha256"),
        "model_id": model.get("model_id"),
        "revision": model.get("revision"),
        "gguf": model.get("gguf"),
        "weights_fingerprint": model.get("weights_fingerprint"),
        "model_dtype": metadata.get("model_dtype"),
        "dataset": metadata.get("dataset"),
        "documents": metadata.get("documents"),
        "tokens": metadata.get("tokens"),
        "seq_len": metadata.get("seq_len"),
        "tokenization": metadata.get("tokenization"),
    }


_NO_DOCUMENTS = torch.zeros((0, 2), dtype=torch.int64)


def _bits(truncation: TruncationConfig, plan) -> str:
    """How the kept numbers are stored, for the log line."""
    if plan.key_bits_per_layer is not None or plan.value_bits_per_layer is not None:
        return f", bits per latent channel by water-filling ({truncation.scheme} codes)"
    if truncation.latent_bits is None:
        return ""
    return f", latents in {truncation.latent_bits} bits" + (
        "" if truncation.latent_bits == 16 else f" ({truncation.scheme})"
    )


def _ranks(per_layer: list[int] | None) -> str:
    if per_layer is None:
        return "full"
    return f"{per_layer[0]} in all {len(per_layer)} layers" if len(set(per_layer)) == 1 else str(per_layer)


def check_cache_kept(cache: LowRankCache, output: torch.Tensor, config) -> None:
    """`generate` feeds every token but the last through the cache; if the cache holds fewer, the model replaced
    it mid-generation (Phi-3 longrope does past original_max_position_embeddings) and the rest ran uncompressed."""
    held, expected = cache.get_seq_length(), output.shape[1] - 1
    if held != expected:
        switch = getattr(config, "original_max_position_embeddings", None)
        reason = ""
        if switch:
            reason = (
                f" ({config.model_type} swaps the cache once the input reaches "
                f"original_max_position_embeddings + 1 = {switch + 1} tokens)"
            )
        raise RuntimeError(
            f"generate replaced kvcore's low-rank cache: it holds {held} of the {expected} tokens fed{reason}, so the "
            "rest of the generation ran with a full cache and its scores would be silently wrong. "
            "Keep prompt + max_gen_toks below that length"
        )
