"""INT4/INT8 packing: exact round trips and bit-identity with compressed-tensors' own pack/unpack."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conqur_vllm.formats import pack_int4, pack_int32, unpack_int4, unpack_int32


def _load_ct_helpers():
    """compressed-tensors' pack helpers, loaded from their file (importing the package pulls in transformers)."""
    pkg = importlib.util.find_spec("compressed_tensors")
    if pkg is None or pkg.origin is None:
        pytest.skip("compressed-tensors is not installed", allow_module_level=True)
    root = Path(pkg.origin).parent / "compressors"
    candidates = [
        root / "pack_quantized" / "helpers.py",
        root / "quantized_compressors" / "pack_quantized.py",
    ]
    path = next((p for p in candidates if p.is_file() and "def pack_to_int32" in p.read_text()), None)
    if path is None:
        pytest.skip("compressed-tensors' pack_to_int32 not found at a known place", allow_module_level=True)
    spec = importlib.util.spec_from_file_location("_ct_pack_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ct_helpers = _load_ct_helpers()
ct_pack, ct_unpack = ct_helpers.pack_to_int32, ct_helpers.unpack_from_int32


def _codes(rows: int, cols: int, bits: int, seed: int, signed: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo = -(1 << (bits - 1)) if signed else 0
    q = torch.randint(lo, lo + (1 << bits), (rows, cols), generator=g)
    # make sure both range ends occur
    q.view(-1)[0], q.view(-1)[-1] = lo, lo + (1 << bits) - 1
    return q.to(torch.int8 if signed else torch.uint8)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_int4_round_trip_and_matches_compressed_tensors(rows: int, cols: int, seed: int) -> None:
    q = _codes(rows, cols, 4, seed)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (rows, -(-cols // 8))
    assert torch.equal(unpack_int4(packed, cols), q)
    assert torch.equal(packed, ct_pack(q, 4))
    assert torch.equal(ct_unpack(packed, 4, torch.Size([rows, cols])), q)
    assert torch.equal(unpack_int4(ct_pack(q, 4), cols), q)


def test_all_int4_values_at_every_nibble_position() -> None:
    # every value -8..7 at every position 0..7 of an int32 word, plus a padded tail
    values = torch.arange(-8, 8, dtype=torch.int8)
    q = torch.stack([values.roll(k) for k in range(8)]).repeat(1, 2)[:, :29]
    packed = pack_int4(q)
    assert torch.equal(packed, ct_pack(q, 4))
    assert torch.equal(unpack_int4(packed, 29), q)
    # layout: value i of a group of 8 sits at bits 4*i as v + 8
    word = int(packed[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [int(v) + 8 for v in q[0, :8]]


def test_padding_is_zero_fields() -> None:
    q = torch.full((2, 3), -8, dtype=torch.int8)  # stored nibble 0, so padding is indistinguishable from -8
    packed = pack_int4(q)
    assert packed.shape == (2, 1) and int(packed.abs().max()) == 0
    q = torch.full((1, 3), 7, dtype=torch.int8)
    assert int(pack_int4(q)[0, 0]) == 0xFFF


@pytest.mark.parametrize("rows,cols", [(4, 8), (5, 13), (17, 3)])
def test_pack_along_rows_matches_compressed_tensors(rows: int, cols: int) -> None:
    q = _codes(rows, cols, 4, seed=rows * cols)
    packed = pack_int4(q, packed_dim=0)
    assert packed.shape == (-(-rows // 8), cols)
    assert torch.equal(packed, ct_pack(q, 4, packed_dim=0))
    assert torch.equal(unpack_int4(packed, rows, packed_dim=0), q)
    assert torch.equal(ct_unpack(packed, 4, torch.Size([rows, cols]), packed_dim=0), q)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 21), seed=st.integers(0, 2**16))
def test_int8_packing_matches_compressed_tensors(rows: int, cols: int, seed: int) -> None:
    q = _codes(rows, cols, 8, seed)
    packed = pack_int32(q, 8)
    assert packed.shape == (rows, -(-cols // 4))
    assert torch.equal(packed, ct_pack(q, 8))
    assert torch.equal(unpack_int32(packed, 8, cols), q)


@pytest.mark.parametrize("bits", [4, 8])
def test_unsigned_codes_pack_as_signed_plus_offset(bits: int) -> None:
    u = _codes(3, 19, bits, seed=bits, signed=False)
    signed = (u.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(pack_int32(u, bits), pack_int32(signed, bits))
    assert torch.equal(unpack_int32(pack_int32(u, bits), bits, 19, signed=False), u)


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([[16]], dtype=torch.uint8))
    with pytest.raises(TypeError, match="int8"):
        pack_int4(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="bits"):
        pack_int32(torch.zeros(2, 8, dtype=torch.int8), 3)
    with pytest.raises(ValueError, match="size"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int32), 20)
    with pytest.raises(ValueError, match="2-D"):
        pack_int4(torch.zeros(8, dtype=torch.int8))
