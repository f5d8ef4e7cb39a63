"""Integer GEMM ``out = a_scale * sum_g w_scale[:, g] * (A @ Bᵀ)_g + bias`` in Triton (W4A4, W4A8, W8A8).

- A: int8 codes ``[M, K]`` (INT4-valued for W4A4, full int8 for W4A8), float32 per-token scales ``[M, 1]``.
- B: either packed INT4 ``[N, K/8]`` int32 (compressed-tensors ``pack-quantized``: value ``v`` as nibble
  ``v + 8``, value ``i`` of a word at bits ``4i``, words along K), read as bytes ``[N, K/2]`` and unpacked
  in-kernel to int8, four bytes per 32-bit register (:func:`_unpack_nibbles`); or int8 ``[N, K]``.
- ``tl.dot`` int8 x int8 with int32 accumulation (INT8 tensor-core MMA), one int32 accumulator per K-group
  (``w_scale [N, G]``, G = 1 for per-channel scales); each group's sum is scaled into a float32 accumulator.
- Epilogue in float32 in the reference op's order (``Σ_g acc_g * w_scale_g``, ``* a_scale``, ``+ bias``),
  cast to the output dtype (bf16 / fp16 / fp32). :func:`int_mm` stores the raw int32 accumulators instead.

Tile configs are fixed per M bucket (no autotuning; chosen from the H100 sweep of ``benchmarks/kernels.py``):
decode (M <= 16), mid (M < 256), prefill (M >= 256). The K tile divides the group size, so no K tile straddles
two groups; K must be a multiple of 32. Decode calls with per-channel scales and few output tiles split K over
more programs (:func:`split_k_for`); their int32 partial sums meet in a workspace and a second kernel adds them
in order and applies the epilogue, so the result is the same bits for every split.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from conqur_vllm.kernels.triton_quant import interpreted

MIN_BLOCK_K = 32
SPLIT_K_MAX_M = 16
"""Calls with at most this many rows may split K across programs (decode: too few output tiles to fill the GPU)."""
SPLIT_K_WAVES = 4
"""Automatic splits aim at about this many programs per SM."""
SPLIT_K_MIN_TILES = 12
"""... and keep at least this many K tiles per split (H100: K = 4096 ran faster unsplit, K = 14336 split 4)."""
EPILOGUE_BLOCK_N = 256
_WORKSPACE: dict[torch.device, Tensor] = {}


@dataclass(frozen=True)
class TileConfig:
    """Block sizes, warps and pipeline depth of one launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: int = 0
    """K splits for per-channel calls of at most SPLIT_K_MAX_M rows; 0 picks them from the SM count."""


DECODE = TileConfig(16, 32, 256, 4, 4)
MID = TileConfig(64, 64, 128, 4, 4)
PREFILL = TileConfig(128, 128, 128, 4, 4)


def config_for(m: int) -> TileConfig:
    """The fixed tile config for ``m`` rows."""
    return DECODE if m <= 16 else MID if m < 256 else PREFILL


def _fit_block_k(cfg: TileConfig, group_size: int) -> TileConfig:
    bk = cfg.block_k
    while bk > MIN_BLOCK_K and group_size % bk:
        bk //= 2
    return cfg if bk == cfg.block_k else replace(cfg, block_k=bk)


def supports(k: int, groups: int = 1) -> bool:
    """Whether the kernel handles reduction size ``k`` split into ``groups`` scale groups."""
    return k > 0 and groups > 0 and k % groups == 0 and (k // groups) % MIN_BLOCK_K == 0


@triton.jit
def _unpack_nibbles(packed, USE_ASM: tl.constexpr):
    """Signed values of the low and high nibbles (stored as ``v + 8``) of int8 ``packed``.

    With ``USE_ASM`` four bytes share one 32-bit register: ``((b & 0x0F0F0F0F) + 0x78787878) ^ 0x80808080``
    maps every nibble ``n`` to the int8 ``n - 8`` without carries between bytes (7 instructions per 8 values).
    Without it (the Triton interpreter) the same values come from int32 arithmetic.
    """
    if USE_ASM:
        low, high = tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 t;
            and.b32 t, $2, 0x0F0F0F0F;
            add.u32 t, t, 0x78787878;
            xor.b32 $0, t, 0x80808080;
            shr.u32 t, $2, 4;
            and.b32 t, t, 0x0F0F0F0F;
            add.u32 t, t, 0x78787878;
            xor.b32 $1, t, 0x80808080;
            }
            """,
            constraints="=r,=r,r", args=[packed], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        wide = packed.to(tl.int32)
        low = ((wide & 0xF) - 8).to(tl.int8)
        high = (((wide >> 4) & 0xF) - 8).to(tl.int8)
    return low, high


@triton.jit
def _load_b(b_ptr, offs_n, k0, N, stride_bn, stride_bk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            B_PACKED: tl.constexpr, USE_ASM: tl.constexpr):
    """The int8 ``[BLOCK_K, BLOCK_N]`` tile of Bᵀ at K offset ``k0`` (packed: B read as bytes ``[N, K/2]``)."""
    n_mask = offs_n[None, :] < N
    if B_PACKED:
        byte = (k0 // 2) + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(b_ptr + offs_n[None, :] * stride_bn + byte[:, None] * stride_bk, mask=n_mask, other=0)
        low, high = _unpack_nibbles(packed, USE_ASM)  # values k = 2j and 2j + 1 of byte j
        tile = tl.reshape(tl.permute(tl.join(low, high), (0, 2, 1)), (BLOCK_K, BLOCK_N))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tile = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk, mask=n_mask, other=0)
    return tile


@triton.jit
def _int_gemm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, acc_ptr,
    M, N, K, group_size, k_split,
    stride_am, stride_ak, stride_bn, stride_bk, stride_bsn, stride_bsg, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    B_PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, RAW_ACC: tl.constexpr, GROUPED: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_ASM: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = (M + BLOCK_M - 1) // BLOCK_M
    grid_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows_here = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_here
    pid_n = (pid % width) // rows_here

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    c_mask = m_mask[:, None] & n_mask[None, :]

    k_lo = tl.program_id(1) * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    out = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m64[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_mask[:, None], other=0)
        b = _load_b(b_ptr, offs_n64, k0, N, stride_bn, stride_bk, BLOCK_N, BLOCK_K, B_PACKED, USE_ASM)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if GROUPED:  # noqa: SIM102 (compile-time branch around a run-time one: kept apart for Triton)
            if (k0 + BLOCK_K) % group_size == 0:  # last tile of a group: scale it into the float sum
                ws = tl.load(b_scale_ptr + offs_n64 * stride_bsn + (k0 // group_size) * stride_bsg,
                             mask=n_mask, other=0.0)
                out += acc.to(tl.float32) * ws[None, :]
                acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)

    if SPLIT_K > 1:  # this split's int32 partial sums; _split_k_epilogue_kernel adds them up in order
        part = acc_ptr + tl.program_id(1).to(tl.int64) * M * N
        tl.store(part + offs_m64[:, None] * N + offs_n64[None, :], acc, mask=c_mask)
    else:
        c_ptrs = c_ptr + offs_m64[:, None] * stride_cm + offs_n64[None, :] * stride_cn
        if RAW_ACC:
            tl.store(c_ptrs, acc, mask=c_mask)
        else:
            if not GROUPED:
                ws = tl.load(b_scale_ptr + offs_n64 * stride_bsn, mask=n_mask, other=0.0)
                out += acc.to(tl.float32) * ws[None, :]
            out = out * tl.load(a_scale_ptr + offs_m64, mask=m_mask, other=0.0)[:, None]
            if HAS_BIAS:
                out = out + tl.load(bias_ptr + offs_n64, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _split_k_epilogue_kernel(
    acc_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, M, N, splits, stride_bsn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, RAW_ACC: tl.constexpr,
):
    """Sum the splits' int32 partials (exact) and finish like the unsplit kernel's epilogue."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    acc_ptrs = acc_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
    for split in range(splits):
        acc += tl.load(acc_ptrs + split * M * N, mask=mask, other=0)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    if RAW_ACC:
        tl.store(c_ptrs, acc, mask=mask)
    else:
        ws = tl.load(b_scale_ptr + offs_n * stride_bsn, mask=n_mask, other=0.0)
        out = acc.to(tl.float32) * ws[None, :]
        out = out * tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


def _check(a_q: Tensor, b: Tensor, packed: bool) -> tuple[int, int, int]:
    if a_q.dtype != torch.int8 or a_q.dim() != 2:
        raise ValueError(f"activations must be 2-D int8 codes, got {a_q.dtype} {tuple(a_q.shape)}")
    m, k = a_q.shape
    want = torch.int32 if packed else torch.int8
    cols = k // 8 if packed else k
    if b.dtype != want or b.dim() != 2 or b.shape[1] != cols:
        kind = "packed INT4" if packed else "int8"
        raise ValueError(f"weights must be {want} [N, {cols}] for K={k} ({kind}), "
                         f"got {b.dtype} {tuple(b.shape)}")
    return m, b.shape[0], k


def reserve_workspace(numel: int, device: torch.device) -> Tensor:
    """The int32 split-K buffer of ``device`` (one per device, shared by all layers), grown to ``numel``.

    The plugin reserves it when weights load (:func:`workspace_size`), before any CUDA-graph capture, so no
    call allocates; calls run in stream order and each overwrites what it reads.
    """
    device = torch.device(device)
    ws = _WORKSPACE.get(device)
    if ws is None or ws.numel() < numel:
        ws = torch.empty(max(numel, 1), dtype=torch.int32, device=device)
        _WORKSPACE[device] = ws
    return ws


def workspace_size(n: int, k: int, device: torch.device) -> int:
    """int32 elements the automatic split-K needs for an ``[n, k]`` weight at up to ``SPLIT_K_MAX_M`` rows."""
    split = split_k_for(SPLIT_K_MAX_M, n, k, DECODE, 1, torch.device(device))
    return split * SPLIT_K_MAX_M * n if split > 1 else 0


@lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def split_k_for(m: int, n: int, k: int, cfg: TileConfig, groups: int, device: torch.device) -> int:
    """K splits of one call: ``cfg.split_k`` when set, else enough to give every SM ~SPLIT_K_WAVES programs.

    Only per-channel scales (``groups == 1``) and at most ``SPLIT_K_MAX_M`` rows split. The splits' int32
    partial sums go to a workspace and one more kernel adds them (exact, no atomics: the result is the same
    for every split).
    """
    if groups != 1 or m > SPLIT_K_MAX_M:
        return 1
    if cfg.split_k:
        return max(1, min(cfg.split_k, k // cfg.block_k))
    if device.type != "cuda":
        return 1
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split = 1
    while (split * 2 * tiles <= SPLIT_K_WAVES * _multiprocessors(device)
           and k // (split * 2) >= SPLIT_K_MIN_TILES * cfg.block_k):
        split *= 2
    return split


def _run(
    a_q: Tensor, b: Tensor, a_scale: Tensor | None, b_scale: Tensor | None, bias: Tensor | None,
    out: Tensor, packed: bool, config: TileConfig | None,
) -> Tensor:
    m, n, k = a_q.shape[0], b.shape[0], a_q.shape[1]
    groups = 1 if b_scale is None else b_scale.shape[1]
    if not supports(k, groups):
        raise ValueError(f"K={k} with {groups} scale groups: each group must be a multiple of {MIN_BLOCK_K}")
    if m == 0 or n == 0:
        return out
    gs = k // groups
    cfg = _fit_block_k(config or config_for(m), gs)
    raw = a_scale is None
    a_s = out if raw else a_scale.reshape(m).to(torch.float32).contiguous()
    b_s = out if raw else b_scale.to(torch.float32)
    bias_arg = bias if bias is not None else out
    if packed:
        b = b.contiguous().view(torch.int8)  # [N, K/2] bytes: values 2j (low nibble) and 2j + 1 of byte j
    split = split_k_for(m, n, k, cfg, groups, a_q.device)
    k_split = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, k_split)
    acc = reserve_workspace(splits * m * n, a_q.device) if splits > 1 else out
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    _int_gemm_kernel[(tiles, splits)](
        a_q, b, a_s, b_s, bias_arg, out, acc,
        m, n, k, gs, k_split,
        a_q.stride(0), a_q.stride(1), b.stride(0), b.stride(1),
        b_s.stride(0) if not raw else 0, b_s.stride(1) if not raw else 0, out.stride(0), out.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        B_PACKED=packed, HAS_BIAS=bias is not None, RAW_ACC=raw, GROUPED=groups > 1,
        SPLIT_K=splits, USE_ASM=not interpreted(_int_gemm_kernel),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        block_m = triton.next_power_of_2(max(m, 1))
        _split_k_epilogue_kernel[(triton.cdiv(n, EPILOGUE_BLOCK_N), triton.cdiv(m, block_m))](
            acc, a_s, b_s, bias_arg, out, m, n, splits, b_s.stride(0) if not raw else 0, out.stride(0),
            out.stride(1),
            BLOCK_M=block_m, BLOCK_N=EPILOGUE_BLOCK_N, HAS_BIAS=bias is not None, RAW_ACC=raw,
        )
    return out


def _out(out: Tensor | None, m: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if out is None:
        return torch.empty((m, n), dtype=dtype, device=device)
    if out.shape != (m, n) or out.dtype != dtype:
        raise ValueError(f"out must be {dtype} [{m}, {n}], got {out.dtype} {tuple(out.shape)}")
    return out


def int_mm(
    a_q: Tensor, b: Tensor, *, packed: bool = True, config: TileConfig | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Exact int32 ``a_q @ Bᵀ`` (B packed INT4 ``[N, K/8]`` int32 if ``packed``, else int8 ``[N, K]``)."""
    m, n, _ = _check(a_q, b, packed)
    return _run(a_q, b, None, None, None, _out(out, m, n, torch.int32, a_q.device), packed, config)


def scaled_mm(
    a_q: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16, *, packed: bool = True, config: TileConfig | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``a_scale * Σ_g b_scale[:, g] * (a_q @ Bᵀ)_g + bias`` (the ``conqur::int_scaled_mm`` contract)."""
    m, n, _ = _check(a_q, b, packed)
    if b_scale.dim() != 2 or b_scale.shape[0] != n:
        raise ValueError(f"weight scales must be [N={n}, G], got {tuple(b_scale.shape)}")
    if a_scale.numel() != m:
        raise ValueError(f"activation scales must have M={m} entries, got {tuple(a_scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [N={n}], got {tuple(bias.shape)}")
    out = _out(out, m, n, out_dtype, a_q.device)
    bias = bias.contiguous() if bias is not None else None
    return _run(a_q, b, a_scale, b_scale, bias, out, packed, config)
