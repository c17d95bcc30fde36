"""The calibration artifact: `basis.safetensors` (spectra and bases) + `kvcore.json` (what produced them).

Per space (`key_pre_rope`, `key_post_rope`, `value`), for all layers at once:
  eigenvalues        (layers, D)                   float64, descending: σ_i² of the stacked activations
  eigenvectors       (layers, D, D)                float32, column i = right singular vector i
  head_eigenvalues   (layers, kv_heads, head_dim)  float64, spectra of each head's diagonal Gram block
  head_eigenvectors  (layers, kv_heads, head_dim, head_dim) float32
and `token_count` (layers,), `weights_sample` (parameters, 64): a strided sample of the calibrated
model's weights, so an evaluation can tell the same weights loaded in another dtype from other weights, and
`document_digests` (documents, 2) int64: a digest of each calibrated document's text and prompt (overlap.py), so
an evaluation can tell whether it scores documents the calibration saw.
No pickles: safetensors and JSON only. `kvcore.json` records the sha256 of `basis.safetensors`; loading
verifies it and refuses non-finite values and negative eigenvalues beyond round-off, so a damaged or altered basis
is an error, never a number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvcore_eval import outputs
from kvcore_eval.model.models import KVGeometry, file_sha256
from kvcore_eval.spaces import SPACES

FORMAT_VERSION = 2
BASIS_FILE = "basis.safetensors"
METADATA_FILE = "kvcore.json"


@dataclass
class Calibration:
    """Eigen-decomposed Grams of one model on one dataset, plus the metadata that names them."""

    metadata: dict[str, Any]
    eigenvalues: dict[str, torch.Tensor]  # space -> (layers, D)
    eigenvectors: dict[str, torch.Tensor]  # space -> (layers, D, D)
    head_eigenvalues: dict[str, torch.Tensor]  # space -> (layers, kv_heads, head_dim)
    head_eigenvectors: dict[str, torch.Tensor]  # space -> (layers, kv_heads, head_dim, head_dim)
    token_count: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # (layers,)
    weights_sample: torch.Tensor | None = None  # (parameters, 64) float32, see models.weights_sample
    document_digests: torch.Tensor | None = None  # (documents, 2) int64: text, prompt digests (overlap.py)
    path: Path | None = None  # the artifact folder; eigenvectors not held in memory are read from it by `basis`

    @property
    def geometry(self) -> KVGeometry:
        return KVGeometry(**self.metadata["model"]["geometry"])

    def basis(self, space: str, layer: int, rank: int, granularity: str) -> torch.Tensor:
        """The top-`rank` right singular vectors of one layer: (D, rank) for granularity=layer, (kv_heads, head_dim,
        rank) for head. Read as a slice of basis.safetensors when the eigenvectors were not loaded."""
        name = "eigenvectors" if granularity == "layer" else "head_eigenvectors"
        held = getattr(self, name).get(space)
        if held is not None:
            return held[layer][..., :rank]
        from safetensors import safe_open

        with safe_open(str(Path(self.path) / BASIS_FILE), framework="pt") as f:
            vectors = f.get_slice(f"{space}.{name}")[layer, ..., :rank]
        if not torch.isfinite(vectors).all():
            raise ValueError(
                f"{self.path}/{BASIS_FILE} holds NaN or inf in {space}.{name}[{layer}]: re-run the calibration"
            )
        return vectors


def sign_fixed(vectors: torch.Tensor) -> torch.Tensor:
    """Columns with their largest-magnitude entry positive (deterministic bases): (..., n, k)."""
    pivot = vectors.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(vectors, -2, pivot))
    return vectors * torch.where(signs == 0, 1.0, signs)


def _eigh_descending(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of symmetric (..., n, n) float64 matrices, eigenvalues descending, signs fixed
    so that each eigenvector's largest-magnitude entry is positive (deterministic bases)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.to(torch.float64))
    return eigenvalues.flip(-1), sign_fixed(eigenvectors.flip(-1))


def decompose(
    grams: dict[str, torch.Tensor], token_count: torch.Tensor, geometry: KVGeometry, metadata: dict[str, Any]
) -> Calibration:
    """Eigendecompose each layer's Gram (layers, D, D) and its per-head diagonal blocks."""
    eigenvalues, eigenvectors, head_eigenvalues, head_eigenvectors = {}, {}, {}, {}
    heads, head_dim = geometry.kv_heads, geometry.head_dim
    for space in SPACES:
        gram = grams[space].to(torch.float64)
        values, vectors = _eigh_descending(gram)
        eigenvalues[space], eigenvectors[space] = values.cpu(), vectors.float().cpu()
        blocks = torch.stack(
            [gram[:, h * head_dim : (h + 1) * head_dim, h * head_dim : (h + 1) * head_dim] for h in range(heads)], dim=1
        )
        values, vectors = _eigh_descending(blocks)  # (layers, heads, head_dim[, head_dim])
        head_eigenvalues[space], head_eigenvectors[space] = values.cpu(), vectors.float().cpu()
    return Calibration(metadata, eigenvalues, eigenvectors, head_eigenvalues, head_eigenvectors, token_count.cpu())


def save_calibration(calibration: Calibration, out_dir: str | Path) -> None:
    """basis.safetensors, then kvcore.json with its checksum; each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"token_count": calibration.token_count.contiguous()}
    if calibration.weights_sample is not None:
        tensors["weights_sample"] = calibration.weights_sample.contiguous()
    if calibration.document_digests is not None:
        tensors["document_digests"] = calibration.document_digests.contiguous()
    for space in SPACES:
        tensors[f"{space}.eigenvalues"] = calibration.eigenvalues[space].contiguous()
        tensors[f"{space}.eigenvectors"] = calibration.eigenvectors[space].contiguous()
        tensors[f"{space}.head_eigenvalues"] = calibration.head_eigenvalues[space].contiguous()
        tensors[f"{space}.head_eigenvectors"] = calibration.head_eigenvectors[space].contiguous()
    outputs.atomic_save_safetensors(tensors, out_dir / BASIS_FILE)
    metadata = {
        **calibration.metadata,
        "format_version": FORMAT_VERSION,
        "basis_sha256": file_sha256(str(out_dir / BASIS_FILE)),
    }
    outputs.atomic_write_json(out_dir / METADATA_FILE, metadata)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The artifact's JSON metadata alone (cheap: used to validate before any weights load)."""
    path = Path(path)
    metadata_path = path / METADATA_FILE
    if not metadata_path.is_file() or not (path / BASIS_FILE).is_file():
        raise FileNotFoundError(
            f"no calibration artifact at {path} (expected {BASIS_FILE} and {METADATA_FILE}); "
            f"create one with `kvcore-eval calibrate --model ... --dataset ... --out {path}`"
        )
    metadata = outputs.read_json(metadata_path, "calibration metadata")
    if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
        found = metadata.get("format_version") if isinstance(metadata, dict) else None
        raise ValueError(
            f"{metadata_path} has format_version {found}, this kvcore-eval reads "
            f"{FORMAT_VERSION}: re-run `kvcore-eval calibrate` with this version"
        )
    return metadata


def _check_shapes(metadata: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: str | Path) -> None:
    """kvcore.json's geometry must be the shape of every tensor in basis.safetensors."""
    g = KVGeometry(**metadata["model"]["geometry"])
    layers, width, heads, head_dim = g.num_layers, g.width, g.kv_heads, g.head_dim
    expected = {"token_count": (layers,)}
    for space in SPACES:
        expected[f"{space}.eigenvalues"] = (layers, width)
        expected[f"{space}.eigenvectors"] = (layers, width, width)
        expected[f"{space}.head_eigenvalues"] = (layers, heads, head_dim)
        expected[f"{space}.head_eigenvectors"] = (layers, heads, head_dim, head_dim)
    if bad := [
        f"{key} {shapes.get(key)} (expected {shape})" for key, shape in expected.items() if shapes.get(key) != shape
    ]:
        raise ValueError(
            f"{Path(path) / METADATA_FILE} says {g.to_dict()}, but {BASIS_FILE} holds {', '.join(bad[:2])}: the "
            f"metadata was edited or belongs to another basis; re-run `kvcore-eval calibrate --out {path} --overwrite`"
        )


# An eigenvalue of a Gram (positive semi-definite) is >= 0 up to float64 round-off of eigh, |error| ~ D·eps·λ_max.
NEGATIVE_TOLERANCE = 1e-9


def negative_spectra(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The eigenvalue tensors with a layer (or head) whose smallest eigenvalue is below −NEGATIVE_TOLERANCE of its
    largest magnitude: not a Gram's spectrum (negated, or edited), whatever its checksum says."""
    bad = []
    for key, values in tensors.items():
        if key.endswith("eigenvalues"):
            values = values.double()  # (layers, D) or (layers, heads, head_dim)
            scale = values.abs().amax(dim=-1)
            if (values.amin(dim=-1) < -NEGATIVE_TOLERANCE * scale).any():
                bad.append(key)
    return bad


def load_calibration(path: str | Path, eigenvectors: bool = True) -> Calibration:
    """Load and verify an artifact: checksum of the basis file (streamed), finite values. With `eigenvectors=False`
    the bases stay on disk (the bulk of the file: L·D² floats per space) and `Calibration.basis` reads the slices
    a rank plan needs."""
    from safetensors import safe_open

    metadata = read_metadata(path)
    basis_path = Path(path) / BASIS_FILE
    if file_sha256(str(basis_path)) != metadata.get("basis_sha256"):
        raise ValueError(
            f"{basis_path} does not match the checksum in {METADATA_FILE}: the file is damaged or was "
            f"replaced; re-run `kvcore-eval calibrate --out {path} --overwrite`"
        )
    try:
        with safe_open(str(basis_path), framework="pt") as f:
            _check_shapes(metadata, {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}, path)
            wanted = [key for key in f.keys() if eigenvectors or not key.endswith("eigenvectors")]
            tensors = {key: f.get_tensor(key) for key in wanted}
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error type for a truncated header
        raise ValueError(
            f"{basis_path} cannot be read ({err}): re-run `kvcore-eval calibrate --out {path} --overwrite`"
        ) from err
    if bad := [
        key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]:
        raise ValueError(
            f"{basis_path} holds NaN or inf in {', '.join(bad[:3])}: re-run the calibration (try --dtype float32)"
        )
    if bad := negative_spectra(tensors):
        raise ValueError(
            f"{basis_path} holds eigenvalues below zero beyond round-off in {', '.join(bad[:3])}: a Gram's are >= 0, "
            f"so the file was altered; re-run `kvcore-eval calibrate --out {path} --overwrite`"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {
        name: {} for name in ("eigenvalues", "eigenvectors", "head_eigenvalues", "head_eigenvectors")
    }
    for key, tensor in tensors.items():
        if "." in key:
            space, name = key.split(".", 1)
            parts[name][space] = tensor
    return Calibration(
        metadata,
        token_count=tensors["token_count"],
        weights_sample=tensors.get("weights_sample"),
        document_digests=tensors.get("document_digests"),
        path=Path(path),
        **parts,
    )
