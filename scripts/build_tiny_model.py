"""Build the embedded default model `examples/tiny-llama`: a byte-level tokenizer and a ~0.2M-parameter
Llama-style LM (RoPE, grouped-query attention) trained for a few hundred steps on `examples/data`.

It is a demonstration model: small enough to ship and to run every command in seconds on a CPU, trained
just enough that its keys and values carry learned structure rather than random weights' flat spectra.
Rebuild: `python scripts/build_tiny_model.py` (deterministic for a given torch version).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvcore_eval.calibration.data import SOURCES, format_record, source_records

logger = logging.getLogger("build_tiny_model")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (256) plus pad/bos/eos: no training, no download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def corpus(data_dir: Path) -> str:
    texts = []
    for source in SOURCES.values():
        for record in source_records(source, data_dir=data_dir):
            prompt, response = format_record(record, source.prompt_format, source.name)
            texts.append(prompt + response)
    return "\n\n".join(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="examples/data")
    parser.add_argument("--out", default="examples/tiny-llama")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level="INFO")
    torch.manual_seed(0)

    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(corpus(Path(args.data_dir)))["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - args.seq_len - 1, (16,))
        batch = torch.stack([ids[s : s + args.seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            logger.info("step %d loss %.3f", step, loss.item())
    out = Path(args.out)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "TRAINING.json").write_text(
        json.dumps(
            {"steps": args.steps, "seq_len": args.seq_len, "final_loss": loss.item(), "corpus_tokens": len(ids)},
            indent=2,
        )
        + "\n"
    )
    logger.info("saved %s (%d parameters)", out, sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    main()
