"""What both benchmarks share: the model presets and how a run builds its random-weight Llama."""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcore_eval.models import KVGeometry, kv_geometry

PRESETS = {
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64),
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default="small", help="small (58M, CPU) or 1b (Llama-3.2-1B-like, GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def build_model(args: argparse.Namespace, max_positions: int) -> tuple[LlamaForCausalLM, KVGeometry, torch.device]:
    """A Llama of the preset's shape with random weights (speed and memory do not depend on them)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=max_positions, **PRESETS[args.preset])
    model = LlamaForCausalLM(config).to(device, getattr(torch, args.dtype)).eval()
    return model, kv_geometry(config), device


def describe(model: LlamaForCausalLM, geometry: KVGeometry, args: argparse.Namespace) -> str:
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    return f"model: Llama {args.preset} ({parameters:.0f}M params), {geometry.num_layers} layers, D={geometry.width}, {args.dtype} on {args.device}"
