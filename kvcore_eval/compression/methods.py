"""What a compressed cache is made of, declared once and light (no torch), so that configurations and the command
line can name and check it before anything loads.

`BASES`: the sources of bases (`basis=`) with what each needs and allows (`check_basis`). `METHODS`: the frontier's
methods, each one codec, a basis and the bits of each latent channel, as one small dataclass per kind: `LowRank`
(bits {native or 8, 0}), `Quantized` (every dimension at N bits, as they are or rotated), `Spectral` (bits per
eigen-channel by reverse water-filling), `Peer` (transformers' own QuantizedCache). A method's one free knob is what
the frontier sets by bisection to meet a budget in measured bytes: a rank, the total dimensions a budget allocation
spreads over layers and kinds, a budget in bits, or nothing (one point at its measured bytes). `Budget`: a budget as
a fraction of the full cache or in bits per cached number.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BasisSource:
    """What one source of bases (`basis=`) needs and allows, declared once and checked on a TruncationConfig before
    anything loads (`check_basis`); the cache and the wrapper read these flags, never the source's name."""

    name: str
    description: str  # how a design sentence names what truncates a task
    calibrated: bool = False  # its bases come from `calibration=`
    spectrum: bool = False  # has a spectrum that energy, ner, sensitivity and waterfill budgets can spend by
    per_sequence: bool = False  # computed at each sequence's prefill and stored with it
    whole: bool = False  # applied at full width (a rotation): nothing dropped, its coordinates coded
    projects: bool = True  # identity: nothing is projected, the states are stored as they are
    post_rope_keys: bool = True  # can serve post-RoPE keys (the weights' SVD cannot: RoPE depends on the position)
    seeded: str | None = None  # the `bases` function that builds it from a seed, before the weights load
    from_weights: bool = False  # built from the loaded model's projection weights (checked on the model)


BASES = {
    source.name: source
    for source in (
        BasisSource("data", "the bases of its own calibration", calibrated=True, spectrum=True),
        BasisSource(
            "weights",
            "the SVD of its projection weights [W | b] (data-free)",
            spectrum=True,
            post_rope_keys=False,
            from_weights=True,
        ),
        BasisSource("random", "seeded random orthonormal bases", seeded="random_bases"),
        BasisSource("sequence", "each sequence's own prefill SVD, stored per sequence", per_sequence=True),
        BasisSource(
            "rotation", "seeded randomized Hadamard rotations (kept whole)", whole=True, seeded="rotation_bases"
        ),
        BasisSource("identity", "no basis (the states as they are)", projects=False),
    )
}


def check_basis(config: Any) -> None:
    """The constraints of `config.basis` (a TruncationConfig) on the other options: ValueErrors that name the fix."""
    source = BASES[config.basis]
    if not source.post_rope_keys and config.key_space == "post_rope" and config.truncates_keys:
        raise ValueError(
            f"basis={source.name} with key_space=post_rope: post-RoPE keys are rotated by their position, so the "
            "projection weights give no basis for them: use key_space=pre_rope, or truncate=values"
        )
    if source.per_sequence and config.granularity != "layer":
        raise ValueError(f"basis={source.name} computes one basis per layer and sequence: use granularity=layer")
    if source.per_sequence and config.attention == "latent":
        raise ValueError(
            f"basis={source.name} with attention=latent: latent attention reads one basis per layer, not one per "
            "sequence: use attention=reconstruct"
        )
    if source.whole or not source.projects:
        given = [name for name in ("key_rank", "value_rank") if getattr(config, name) not in (None, "full")]
        given += [name for name in ("rank_budget", "bits") if getattr(config, name) is not None]
        if given:
            raise ValueError(
                f"basis={source.name} keeps every dimension ({source.description}): drop {', '.join(given)} and give "
                "the bits of its codes with latent_bits="
            )
    budgeted = config.budgeted
    if budgeted and config.budget_method == "waterfill" and not source.calibrated:
        raise ValueError(
            f"budget_method=waterfill spends bits by each channel's variance on data, and basis={source.name} has "
            "none: use basis=data (a calibration)"
        )
    if budgeted and source.per_sequence:
        raise ValueError(
            f"a budget with basis={source.name}: each sequence stores its own bases, whose bytes per token depend "
            "on its length, so no plan can meet a budget: give key_rank/value_rank and read the measured bytes"
        )
    if budgeted and not source.spectrum and config.budget_method != "uniform":
        raise ValueError(
            f"budget_method={config.budget_method} needs a spectrum and basis={source.name} has none: use "
            "budget_method=uniform, or give key_rank/value_rank"
        )
    if budgeted and not source.calibrated and config.budget_method == "sensitivity":
        raise ValueError(
            "budget_method=sensitivity reads ND-PPL measured with the calibrated bases, not "
            f"basis={source.name}: use basis=data, or budget_method=energy|ner|uniform"
        )


def check_batch_size(config: Any, batch_size: Any) -> None:
    """A per-sequence basis and the after_prefill protocol need one sequence a batch: lm-eval right-pads
    loglikelihood batches without a mask (padding would enter a sequence's bases), and after_prefill splits each
    input where its own context ends."""
    if str(batch_size) == "1":
        return
    if BASES[config.basis].per_sequence:
        raise ValueError(
            f"basis={config.basis} computes each sequence's basis from its own tokens, and lm-eval right-pads "
            "loglikelihood batches without a mask, so padding would enter the bases: use batch_size=1"
        )
    if config.protocol == "after_prefill":
        raise ValueError(
            "protocol=after_prefill prefills each request's own context before its continuation, one request a "
            "forward: use batch_size=1"
        )


@dataclass(frozen=True)
class LowRank:
    """A basis truncated to a rank per layer: every kept dimension at the model's dtype (or `latent_bits`), the rest
    dropped, bits {native, 0}. Its knob: the rank of every layer (`uniform`), or the total dimensions a budget
    allocation (energy, ner, sensitivity) spreads over layers and kinds."""

    basis: str = "data"
    allocation: str = "uniform"
    latent_bits: int | None = None

    def options(self, knob: int, geometry, sensitivity) -> dict[str, Any]:
        extra: dict[str, Any] = {"basis": self.basis, "latent_bits": self.latent_bits}
        if self.allocation == "uniform":
            spec = ":".join([str(knob)] * geometry.num_layers)  # a list: a bare 1 would be refused as ambiguous
            return {**extra, "key_rank": spec, "value_rank": spec}
        budget = {"rank_budget": knob / (2 * geometry.num_layers * geometry.width), "budget_method": self.allocation}
        if self.allocation == "sensitivity":
            budget["sensitivity"] = str(sensitivity)
        return {**extra, **budget}

    def knob_range(self, geometry) -> tuple[int, int] | None:
        if self.allocation == "uniform":
            return 1, geometry.width
        return 2 * geometry.num_layers, 2 * geometry.num_layers * geometry.width

    def label(self) -> dict[str, Any]:
        return {"basis": self.basis, "allocation": self.allocation, "bits": self.latent_bits}


@dataclass(frozen=True)
class Quantized:
    """Every dimension kept and coded in `bits`: the states as they are (int8, int4, int3, int2) or rotated first by a
    seeded randomized Hadamard transform (TurboQuant's and QuaRot's first stage). No knob: one point at its measured
    bytes, whatever the budget."""

    bits: int
    basis: str = "identity"
    quantizer: str | None = None

    def options(self, knob: int | None, geometry, sensitivity) -> dict[str, Any]:
        return {"basis": self.basis, "latent_bits": self.bits, "quantizer": self.quantizer}

    def knob_range(self, geometry) -> tuple[int, int] | None:
        return None

    def label(self) -> dict[str, Any]:
        return {"basis": self.basis, "allocation": "full", "bits": self.bits}


@dataclass(frozen=True)
class Spectral:
    """The calibrated eigenbasis, each latent channel given its bits by reverse water-filling on the calibrated spectrum
    (`waterfill.allocate_bits`): low rank and intN are its corners. Its knob: the budget in thousandths of a bit per
    cached number, scales and rotary positions included."""

    weighting: str = "relative"

    def options(self, knob: int, geometry, sensitivity) -> dict[str, Any]:
        return {"budget_method": "waterfill", "bits": knob / 1000, "weighting": self.weighting}

    def knob_range(self, geometry) -> tuple[int, int] | None:
        return 50, 16_000

    def label(self) -> dict[str, Any]:
        return {"basis": "data", "allocation": f"waterfill ({self.weighting})", "bits": "mixed"}


@dataclass(frozen=True)
class Peer:
    """transformers' own QuantizedCache (`compression.peers`): KIVI-style asymmetric codes per channel group from the
    optimum-quanto or HQQ backend, the last `residual_length` tokens in full precision. The cache users would switch
    on, as a row beside ours; it runs under protocol=after_prefill only. No knob: one point at its measured bytes."""

    backend: str
    bits: int

    def options(self, knob: int | None, geometry, sensitivity) -> dict[str, Any]:
        return {"basis": "identity", "peer": self.backend, "latent_bits": self.bits}

    def knob_range(self, geometry) -> tuple[int, int] | None:
        return None

    def label(self) -> dict[str, Any]:
        return {"basis": "identity", "allocation": f"QuantizedCache ({self.backend})", "bits": self.bits}


Method = LowRank | Quantized | Spectral | Peer

METHODS: dict[str, Method] = {
    "uniform": LowRank("data", "uniform"),
    "energy": LowRank("data", "energy"),
    "ner": LowRank("data", "ner"),
    "sensitivity": LowRank("data", "sensitivity"),
    "weights": LowRank("weights", "uniform"),
    "random": LowRank("random", "uniform"),
    "sequence": LowRank("sequence", "uniform"),
    "lowrank_int8": LowRank("data", "uniform", 8),
    "int8": Quantized(8),
    "int4": Quantized(4),
    "int3": Quantized(3, quantizer="minmax"),
    "int2": Quantized(2, quantizer="minmax"),
    "rotation4": Quantized(4, "rotation", "midrise"),
    "rotation3": Quantized(3, "rotation", "midrise"),
    "rotation2": Quantized(2, "rotation", "midrise"),
    "spectral": Spectral(),
    "spectral_absolute": Spectral("absolute"),
    "quanto4": Peer("quanto", 4),
    "quanto2": Peer("quanto", 2),
    "hqq4": Peer("hqq", 4),
    "hqq2": Peer("hqq", 2),
}
# The frontier's default: the spectrum-aware code, its corners and the spectrum-blind codes at every rate.
DEFAULT_METHODS = (
    "spectral",
    "energy",
    "lowrank_int8",
    "int8",
    "int4",
    "int3",
    "int2",
    "rotation4",
    "rotation3",
    "rotation2",
)
# The TruncationConfig fields a method sets at each of its points (beyond the ranks every point sets).
METHOD_FIELDS = ("calibration", "basis", "latent_bits", "quantizer", "bits", "weighting", "peer")


def uses_budget_allocation(method: Method) -> bool:
    """Whether the method spends a budget over layer spectra (needs granularity=layer)."""
    return isinstance(method, Spectral) or (isinstance(method, LowRank) and method.allocation != "uniform")


def truncation_for(shared: Any, method: Method, knob: int | None, basis: Path, geometry, sensitivity) -> Any:
    """The TruncationConfig of `method` at `knob` (see each method's docstring), on the options every point shares
    (`shared`), its bases from `basis` (the task's held-out calibration)."""
    return replace(
        shared,
        calibration=str(basis),
        truncate="both",
        overlap="refuse",
        **method.options(knob, geometry, sensitivity),
    )


def full_cache(shared: Any, basis: Path) -> Any:
    """The baseline: nothing truncated (kvcore_hf at full rank is `hf`), on the shared options."""
    return replace(
        shared, calibration=str(basis), truncate="both", overlap="refuse", key_rank="full", value_rank="full"
    )


@dataclass(frozen=True)
class Budget:
    """A budget of bytes per token: a fraction of the full cache, or bits per cached number (`text`: as given)."""

    text: str
    fraction: float | None = None
    bits: float | None = None

    def bytes(self, full_bytes: float, numbers: int) -> float:
        """In bytes per token, for a full cache of `full_bytes` holding `numbers` numbers a token."""
        return self.fraction * full_bytes if self.fraction is not None else self.bits / 8 * numbers


def parse_budgets(text: str) -> list[Budget]:
    """`0.5,0.25` (fractions of the full cache) and `4b,2b` (bits per cached number), largest first in each unit."""
    fractions, bits = set(), set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            (bits if item.endswith("b") else fractions).add(float(item.removesuffix("b")))
        except ValueError:
            raise ValueError(
                f"--budgets {text!r}: {item!r} is neither a fraction (0.25) nor bits per cached number (2b)"
            ) from None
    if not fractions and not bits:
        raise ValueError("--budgets is empty: give fractions of the full cache (0.5,0.25) or bits (4b,2b)")
    if any(not 0 < f < 1 for f in fractions) or any(not 0 < b <= 32 for b in bits):
        raise ValueError(f"--budgets {text!r}: fractions in (0, 1), bits in (0, 32]")
    return [Budget(f"{f:g}", fraction=f) for f in sorted(fractions, reverse=True)] + [
        Budget(f"{b:g}b", bits=b) for b in sorted(bits, reverse=True)
    ]
