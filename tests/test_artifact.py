"""artifact.py: eigendecomposition of known Grams, the save/load round trip, checksums and sliced reads."""

from __future__ import annotations

import json

import pytest
import torch

from kvcore_eval.calibration.artifact import (
    BASIS_FILE,
    FORMAT_VERSION,
    METADATA_FILE,
    decompose,
    load_calibration,
    read_metadata,
    save_calibration,
)
from kvcore_eval.model.models import KVGeometry, file_sha256
from kvcore_eval.spaces import SPACES

GEOMETRY = KVGeometry(num_layers=3, kv_heads=2, head_dim=4)  # D = 8


def activations(seed: int, tokens: int = 40) -> dict[str, torch.Tensor]:
    """space -> (layers, tokens, D) float64 activations, each space and layer of a different spectrum."""
    generator = torch.Generator().manual_seed(seed)
    width = GEOMETRY.width
    scales = torch.logspace(0, -2, width, dtype=torch.float64)  # a decaying spectrum, distinct eigenvalues
    return {
        space: torch.randn(GEOMETRY.num_layers, tokens, width, generator=generator, dtype=torch.float64) * scales
        for space in SPACES
    }


def calibration_of(seed: int = 0):
    acts = activations(seed)
    grams = {space: a.transpose(1, 2) @ a for space, a in acts.items()}  # (layers, D, D)
    token_count = torch.full((GEOMETRY.num_layers,), 40, dtype=torch.int64)
    metadata = {"model": {"geometry": GEOMETRY.to_dict(), "model_id": "synthetic"}, "dataset": {"spec": "none"}}
    return decompose(grams, token_count, GEOMETRY, metadata), acts


@pytest.fixture(scope="module")
def known():
    return calibration_of()


@pytest.fixture(scope="module")
def saved(known, tmp_path_factory):
    calibration, _ = known
    calibration.weights_sample = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    calibration.document_digests = torch.tensor([[1, -2], [2**62, 7]], dtype=torch.int64)
    folder = tmp_path_factory.mktemp("artifact")
    save_calibration(calibration, folder)
    return folder


def test_eigenvalues_are_squared_singular_values_in_descending_order(known):
    calibration, acts = known
    for space in SPACES:
        singular = torch.linalg.svdvals(acts[space])  # (layers, D), descending
        eigenvalues = calibration.eigenvalues[space]
        assert eigenvalues.dtype == torch.float64 and eigenvalues.shape == (GEOMETRY.num_layers, GEOMETRY.width)
        torch.testing.assert_close(eigenvalues, singular**2, rtol=1e-10, atol=1e-12)
        assert (eigenvalues[:, :-1] >= eigenvalues[:, 1:]).all()


def test_eigenvectors_are_orthonormal_and_diagonalize_the_gram(known):
    calibration, acts = known
    identity = torch.eye(GEOMETRY.width, dtype=torch.float64)
    for space in SPACES:
        vectors = calibration.eigenvectors[space].double()  # (layers, D, D), stored float32
        assert calibration.eigenvectors[space].dtype == torch.float32
        torch.testing.assert_close(vectors.transpose(1, 2) @ vectors, identity.expand_as(vectors), atol=1e-6, rtol=0)
        gram = acts[space].transpose(1, 2) @ acts[space]
        rotated = vectors.transpose(1, 2) @ gram @ vectors  # diag(λ) up to float32 rounding of the vectors
        torch.testing.assert_close(
            rotated, torch.diag_embed(calibration.eigenvalues[space]), atol=1e-5 * float(gram.abs().max()), rtol=0
        )


def test_signs_are_fixed_so_the_largest_entry_of_each_eigenvector_is_positive(known):
    calibration, _ = known
    for vectors in list(calibration.eigenvectors.values()) + list(calibration.head_eigenvectors.values()):
        pivot = vectors.abs().argmax(dim=-2, keepdim=True)
        assert (torch.gather(vectors, -2, pivot) > 0).all()
    again, _ = calibration_of()  # the same Grams give the same bases, bit for bit
    for space in SPACES:
        assert torch.equal(again.eigenvectors[space], calibration.eigenvectors[space])


def test_head_spectra_are_those_of_each_heads_diagonal_block(known):
    calibration, acts = known
    hd = GEOMETRY.head_dim
    for space in SPACES:
        assert calibration.head_eigenvalues[space].shape == (GEOMETRY.num_layers, GEOMETRY.kv_heads, hd)
        assert calibration.head_eigenvectors[space].shape == (GEOMETRY.num_layers, GEOMETRY.kv_heads, hd, hd)
        for head in range(GEOMETRY.kv_heads):
            block = acts[space][..., head * hd : (head + 1) * hd]  # (layers, tokens, head_dim)
            torch.testing.assert_close(
                calibration.head_eigenvalues[space][:, head], torch.linalg.svdvals(block) ** 2, rtol=1e-10, atol=1e-12
            )


def test_save_load_round_trip_is_bit_identical(known, saved):
    calibration, _ = known
    loaded = load_calibration(saved)
    for name in ("eigenvalues", "eigenvectors", "head_eigenvalues", "head_eigenvectors"):
        for space in SPACES:
            original, back = getattr(calibration, name)[space], getattr(loaded, name)[space]
            assert back.dtype == original.dtype and torch.equal(back, original), f"{name}[{space}]"
    assert torch.equal(loaded.token_count, calibration.token_count)
    assert torch.equal(loaded.weights_sample, calibration.weights_sample)
    assert torch.equal(loaded.document_digests, calibration.document_digests)
    assert loaded.geometry == GEOMETRY and loaded.path == saved
    assert loaded.metadata["model"] == calibration.metadata["model"]
    assert loaded.metadata["format_version"] == FORMAT_VERSION
    assert loaded.metadata["basis_sha256"] == file_sha256(str(saved / BASIS_FILE))
    assert read_metadata(saved) == loaded.metadata
    assert sorted(p.name for p in saved.iterdir()) == sorted([BASIS_FILE, METADATA_FILE]), "no temporary file left"


def test_optional_tensors_stay_absent(tmp_path):
    calibration, _ = calibration_of(seed=1)
    save_calibration(calibration, tmp_path / "bare")
    loaded = load_calibration(tmp_path / "bare")
    assert loaded.weights_sample is None and loaded.document_digests is None


def test_sliced_reads_equal_full_reads(saved):
    full, lazy = load_calibration(saved), load_calibration(saved, eigenvectors=False)
    assert lazy.eigenvectors == {} and lazy.head_eigenvectors == {}
    for space in SPACES:
        assert torch.equal(lazy.eigenvalues[space], full.eigenvalues[space])
        for layer in range(GEOMETRY.num_layers):
            for rank in (1, 3, GEOMETRY.width):
                sliced = lazy.basis(space, layer, rank, "layer")
                assert sliced.shape == (GEOMETRY.width, rank)
                assert torch.equal(sliced, full.basis(space, layer, rank, "layer"))
                assert torch.equal(sliced, full.eigenvectors[space][layer, :, :rank])
            head = lazy.basis(space, layer, 2, "head")
            assert head.shape == (GEOMETRY.kv_heads, GEOMETRY.head_dim, 2)
            assert torch.equal(head, full.head_eigenvectors[space][layer, ..., :2])


def test_a_tampered_basis_file_is_refused_by_its_checksum(saved, tmp_path):
    import shutil

    for how in ("flip", "swap"):
        copy = tmp_path / how
        shutil.copytree(saved, copy)
        if how == "flip":  # one byte of the values changed, the header intact
            data = bytearray((copy / BASIS_FILE).read_bytes())
            data[-10] ^= 0x01
            (copy / BASIS_FILE).write_bytes(bytes(data))
        else:  # a valid basis file of other Grams put in its place
            other, _ = calibration_of(seed=5)
            save_calibration(other, tmp_path / "other")
            shutil.copy(tmp_path / "other" / BASIS_FILE, copy / BASIS_FILE)
        with pytest.raises(ValueError, match="does not match the checksum"):
            load_calibration(copy)
        with pytest.raises(ValueError, match="does not match the checksum"):
            load_calibration(copy, eigenvectors=False)


def test_an_unreadable_basis_file_with_a_matching_checksum_is_refused(saved, tmp_path):
    import shutil

    copy = tmp_path / "garbage"
    shutil.copytree(saved, copy)
    (copy / BASIS_FILE).write_bytes(b"not a safetensors file")
    metadata = json.loads((copy / METADATA_FILE).read_text())
    metadata["basis_sha256"] = file_sha256(str(copy / BASIS_FILE))
    (copy / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="cannot be read"):
        load_calibration(copy)


def test_missing_files_and_other_format_versions_name_the_fix(saved, tmp_path):
    import shutil

    with pytest.raises(FileNotFoundError, match="kvcore-eval calibrate"):
        read_metadata(tmp_path / "nothing")
    copy = tmp_path / "old"
    shutil.copytree(saved, copy)
    (copy / BASIS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"expected {BASIS_FILE}"):
        load_calibration(copy)
    shutil.copytree(saved, tmp_path / "v1")
    metadata = json.loads((tmp_path / "v1" / METADATA_FILE).read_text())
    (tmp_path / "v1" / METADATA_FILE).write_text(json.dumps({**metadata, "format_version": FORMAT_VERSION - 1}))
    with pytest.raises(ValueError, match=f"format_version {FORMAT_VERSION - 1}"):
        load_calibration(tmp_path / "v1")
    (tmp_path / "v1" / METADATA_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="format_version None"):
        read_metadata(tmp_path / "v1")


def test_non_finite_values_are_refused_at_load_or_at_the_slice_read(tmp_path):
    calibration, _ = calibration_of(seed=2)
    calibration.eigenvalues["key_pre_rope"][1, 0] = float("inf")
    save_calibration(calibration, tmp_path / "inf")
    with pytest.raises(ValueError, match="NaN or inf in key_pre_rope.eigenvalues"):
        load_calibration(tmp_path / "inf", eigenvectors=False)

    calibration, _ = calibration_of(seed=2)
    calibration.eigenvectors["value"][1, 3, 0] = float("nan")
    save_calibration(calibration, tmp_path / "nan")
    with pytest.raises(ValueError, match="NaN or inf in value.eigenvectors"):
        load_calibration(tmp_path / "nan")
    lazy = load_calibration(tmp_path / "nan", eigenvectors=False)  # bases stay on disk: checked as read
    assert torch.isfinite(lazy.basis("value", 0, 8, "layer")).all()
    with pytest.raises(ValueError, match=r"NaN or inf in value.eigenvectors\[1\]"):
        lazy.basis("value", 1, 1, "layer")


def test_metadata_whose_geometry_is_not_the_basis_shape_is_refused(saved, tmp_path):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(saved, copy)
    metadata = json.loads((copy / METADATA_FILE).read_text())
    metadata["model"]["geometry"] = {"num_layers": 3, "kv_heads": 4, "head_dim": 2}  # same D = 8, other heads
    (copy / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"says .*'kv_heads': 4.* but basis.safetensors holds .*head_eigenvalues"):
        load_calibration(copy, eigenvectors=False)


def test_negative_eigenvalues_beyond_round_off_are_refused_whatever_the_checksum(tmp_path):
    """Negated eigenvalues with a recomputed sha256 gave a mean NER of 0.0: a Gram's eigenvalues are >= 0 up to
    round-off, so such an artifact is refused at load; round-off negatives (a rank-deficient Gram) load."""
    calibration, _ = calibration_of(seed=3)
    calibration.eigenvalues["value"] = -calibration.eigenvalues["value"]
    save_calibration(calibration, tmp_path / "negated")  # a consistent file: its checksum is its own
    for eigenvectors in (True, False):
        with pytest.raises(ValueError, match="eigenvalues below zero beyond round-off in value.eigenvalues"):
            load_calibration(tmp_path / "negated", eigenvectors=eigenvectors)

    calibration, _ = calibration_of(seed=3)
    calibration.head_eigenvalues["key_post_rope"][2, 1, -1] = (
        -1e-3 * calibration.head_eigenvalues["key_post_rope"][2, 1, 0]
    )
    save_calibration(calibration, tmp_path / "one-head")
    with pytest.raises(ValueError, match="key_post_rope.head_eigenvalues"):
        load_calibration(tmp_path / "one-head")

    calibration, _ = calibration_of(seed=3)
    largest = calibration.eigenvalues["key_pre_rope"][0, 0]
    calibration.eigenvalues["key_pre_rope"][0, -1] = -1e-13 * largest  # what eigh gives a singular Gram
    save_calibration(calibration, tmp_path / "round-off")
    assert load_calibration(tmp_path / "round-off").eigenvalues["key_pre_rope"][0, -1] < 0
