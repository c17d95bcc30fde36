"""Session fixtures: tiny models of each supported family, built from configs once, saved with the shipped
byte-level tokenizer, plus the shipped example data."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_MODEL = REPO / "examples" / "tiny-llama"
EXAMPLE_DATA = REPO / "examples" / "data"
VOCAB = 259  # the shipped byte-level tokenizer: 256 bytes + pad/bos/eos

# Under pytest-xdist (`-n auto`) each worker gets its share of the cores, not all of them: two workers on two cores
# would otherwise run four torch threads.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

PHI3_SWITCH = 32  # Phi-3's original_max_position_embeddings: longrope switches, and generate swaps the cache, past it
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def free_port() -> int:
    """A TCP port nothing listens on now: launchers started by tests on several xdist workers at once would otherwise
    all take torch's default rendezvous port (29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def family_configs() -> dict:
    """Configs of tiny models, one per family the self-checks cover; GQA, rope scaling, partial rotary,
    sliding windows and per-layer-type rotary wherever the family has them."""
    import transformers as T

    rope = lambda kind, **extra: {"rope_type": kind, "rope_theta": 10000.0, **extra}  # noqa: E731
    return {
        "llama": T.LlamaConfig(
            **_COMMON,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters=rope(
                "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
            ),
        ),
        "mistral": T.MistralConfig(**_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=16),
        "qwen2": T.Qwen2Config(
            **_COMMON,
            num_key_value_heads=2,
            rope_parameters=rope("yarn", factor=8.0, original_max_position_embeddings=64),
        ),
        "qwen3": T.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=16),
        "gemma": T.GemmaConfig(**_COMMON, num_key_value_heads=1, head_dim=16),
        "gemma2": T.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=16),
        "gemma3": T.Gemma3TextConfig(
            **_COMMON,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "phi3": T.Phi3Config(
            **_COMMON,
            num_key_value_heads=2,
            original_max_position_embeddings=PHI3_SWITCH,
            rope_parameters=rope(
                "longrope",
                partial_rotary_factor=0.5,
                short_factor=[1.0] * 4,
                long_factor=[3.0] * 4,
                original_max_position_embeddings=PHI3_SWITCH,
            ),
        ),
        "gpt_neox": T.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            rope_parameters=rope("default", partial_rotary_factor=0.25),
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "gptj": T.GPTJConfig(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            rotary_dim=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "cohere": T.CohereConfig(**_COMMON, num_key_value_heads=2),
        "gpt2": T.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2
        ),
    }


FAMILIES = list(family_configs())


def build_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than default init, so that the attention pattern is far from uniform
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name and "wte" not in name:
                param.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> directory holding a saved tiny model and the byte-level tokenizer."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for family, config in family_configs().items():
        path = root / family
        build_model(config).save_pretrained(path)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(EXAMPLE_MODEL / name, path / name)
        dirs[family] = path
    return dirs


@pytest.fixture(scope="session")
def family_models(family_dirs) -> dict:
    from transformers import AutoModelForCausalLM

    return {
        family: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for family, path in family_dirs.items()
    }


@pytest.fixture(scope="session")
def llama_dir(family_dirs) -> Path:
    return family_dirs["llama"]


@pytest.fixture
def token_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (3, 24), generator=generator)


def calibrate_in_memory(model, input_ids: torch.Tensor):
    """A Calibration of `model` on `input_ids`, without touching disk."""
    from kvcore_eval.calibration.artifact import decompose
    from kvcore_eval.calibration.gram import GramAccumulator, GramRecorder
    from kvcore_eval.model.models import kv_geometry
    from kvcore_eval.model.rope import RopeTap

    geometry = kv_geometry(model.config)
    accumulator = GramAccumulator(geometry)
    tap = RopeTap(model)
    with torch.no_grad():
        model.base_model(input_ids=input_ids, cache=GramRecorder(accumulator, tap), use_cache=True)
    tap.remove()
    return decompose(accumulator.grams, accumulator.token_count, geometry, {"model": {"geometry": geometry.to_dict()}})


@pytest.fixture(scope="session")
def calibration_tokens() -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 64), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def read_only():
    """A function that makes a folder unwritable for the rest of the test: `chattr +i` where the tests run as root
    (root writes through permissions), else chmod 0555; the test is skipped where neither holds."""
    import contextlib
    import os
    import subprocess

    made: list[Path] = []

    def make(folder: Path) -> Path:
        if os.geteuid() == 0:
            if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
                pytest.skip("root without chattr +i: a read-only folder cannot be made here")
        else:
            folder.chmod(0o555)
        made.append(folder)
        try:
            (folder / ".probe").touch()
        except OSError:
            return folder
        (folder / ".probe").unlink()
        pytest.skip(f"{folder} stays writable here")

    yield make
    for folder in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        with contextlib.suppress(OSError):
            folder.chmod(0o755)


def stopped_while_holding_the_lock(args: list[str], lock: Path):
    """A context manager: `python -m kvcore_eval <args>` started, and stopped (SIGSTOP) as soon as it holds `lock`,
    so that the test can act while it is running; on exit it is continued and waited for. Yields the process."""
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    @contextlib.contextmanager
    def run():
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        process = subprocess.Popen(
            [sys.executable, "-m", "kvcore_eval", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            deadline = time.time() + 600
            while time.time() < deadline and process.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    if json.loads(lock.read_text())["pid"] == process.pid:
                        break
                time.sleep(0.02)
            process.send_signal(signal.SIGSTOP)
            assert process.poll() is None, process.communicate()[1][-3000:]
            yield process
        finally:
            process.send_signal(signal.SIGCONT)
            process.stdout_text, process.stderr_text = (b.decode() for b in process.communicate(timeout=600))

    return run()


@contextlib.contextmanager
def lock_held_by_a_thread(out: Path):
    """`out`'s lock (`outputs.run_lock`) held by a thread of this process, standing in for another run, until the
    block ends."""
    import threading

    from kvcore_eval import outputs

    held, release = threading.Event(), threading.Event()

    def other_run() -> None:
        with outputs.run_lock(out):
            held.set()
            release.wait(120)

    thread = threading.Thread(target=other_run)
    thread.start()
    try:
        assert held.wait(60)
        yield
    finally:
        release.set()
        thread.join()
