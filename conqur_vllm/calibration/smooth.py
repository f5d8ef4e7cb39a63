"""Per-channel smoothing scales at the linear inputs (``smooth``), fused for free into the rotated model.

A diagonal scale s moves range between a linear's input and its weight: the quantizer reads ``x / s`` and the
weight becomes ``W diag(s)``, the same function. It costs nothing at serving time where the division can be
fused upstream:

- q/k/v and gate/up inputs (after R1): the RMSNorm weight that feeds them (1 after norm folding) becomes ``1/s``;
- the down_proj input (before R4): up_proj's output rows are divided by s (SwiGLU multiplies them into the
  input channel-wise), down_proj's columns multiplied by s before the online Hadamard;
- the o_proj input (after R2): v_proj's output rows are divided by s (attention mixes value vectors token-wise,
  so each channel keeps its scale; the value cache stores the scaled vectors), o_proj's columns multiplied by
  it. Query heads that share a KV head share its scales.

Per site the scale is ``s_j = a_j^alpha / w_j^(1 - alpha)`` (SmoothQuant's form: a_j the largest |input| of
channel j around its mean on calibration tokens, w_j the largest |weight| in column j over the site's readers),
normalized to geometric mean 1, with alpha chosen per layer and site from a grid (or no scale) by the relative
output error of the quantized linear on calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from conqur_vllm import fake_quant
from conqur_vllm.hadamard import hadamard_transform
from conqur_vllm.models.adapters import ModelAdapter
from conqur_vllm.quant import QuantSpec, activation_spec, dequantize, fake_quantize, quantize_weight_rtn

SMOOTH_ALPHAS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.35, 0.5)
SMOOTH_SITES: tuple[str, ...] = ("qkv", "gate_up", "o", "down")
SMOOTH_SITES_OF: dict[str, tuple[str, ...]] = {"down": ("down",), "writers": ("o", "down"), "all": SMOOTH_SITES}
ACT_CLIPS: tuple[float, ...] = (0.75, 0.85)  # around the ratios a_clip=auto picks on SmolLM2


@dataclass
class SmoothScales:
    """Chosen alpha (None: no scale) and relative error (chosen / unscaled) per ``layer.site``."""

    alphas: dict[str, float | None] = field(default_factory=dict)
    error_ratio: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict:
        return {"alpha": self.alphas, "error_ratio": {k: round(v, 4) for k, v in self.error_ratio.items()}}


def evenly_spaced_rows(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    """At most ``max_rows`` evenly spaced rows of ``x`` flattened to ``[tokens, features]``, detached, float32."""
    rows = x.detach().reshape(-1, x.shape[-1])
    keep = torch.linspace(0, rows.shape[0] - 1, min(max_rows, rows.shape[0]), device=x.device).long()
    return rows[keep].float()


def _record_inputs(model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor, paths: dict[str, str],
                   max_rows: int) -> dict[tuple[int, str], torch.Tensor]:
    """Inputs (before any online transform) of one linear per site and layer, full-precision forward; at most
    ``max_rows`` evenly spaced tokens are kept."""
    rows: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for li, layer in enumerate(adapter.decoder_layers(model)):
        for site, path in paths.items():
            def hook(_module, args, li=li, site=site):
                rows[(li, site)] = evenly_spaced_rows(args[0], max_rows)
            handles.append(layer.get_submodule(path).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model.get_decoder()(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return rows


def _output_error(x: torch.Tensor, weight: torch.Tensor, ref: torch.Tensor, s: torch.Tensor, act_bits: int,
                  symmetric: bool, w_spec: QuantSpec | None, shift: bool, online: bool,
                  online_block: int | None) -> float:
    """Relative error against ``ref = x W^T`` of the quantized linear with scale s (min over a few activation
    clips), in float32; ``online``: the R4 Hadamard runs between the scale and the quantizer."""
    xs, ws = x / s.float(), weight * s.float()
    if online:
        xs, ws = hadamard_transform(xs, online_block), hadamard_transform(ws, online_block)
    mu = xs.mean(0) if shift else torch.zeros_like(xs[0])
    if w_spec is not None:
        ws = dequantize(quantize_weight_rtn(ws, w_spec, clip_search=True), torch.float32)
    energy = float(ref.pow(2).sum(dtype=torch.float64))
    best = float("inf")
    for clip in ACT_CLIPS:
        xq = fake_quantize(xs - mu, activation_spec(act_bits, clip, symmetric)) + mu
        best = min(best, float((xq @ ws.T - ref).pow(2).sum(dtype=torch.float64)) / energy)
    return best


def _scale(a: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """``a^alpha / w^(1 - alpha)`` per input channel (float64), geometric mean 1, ``1/s`` exact in bf16."""
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = s / s.log().mean().exp()
    return 1.0 / (1.0 / s).to(torch.bfloat16).double()  # 1/s is what the bf16 norm weight stores exactly


def _o_layout(layer: nn.Module, adapter: ModelAdapter) -> tuple[int, int]:
    """(head_dim, query heads per KV head) of a decoder layer's attention."""
    v, o = layer.get_submodule(adapter.v_proj), layer.get_submodule(adapter.o_proj)
    return layer.get_submodule(adapter.o_proj.rsplit(".", 1)[0]).head_dim, o.weight.shape[1] // v.weight.shape[0]


def _kv_channel_max(v: torch.Tensor, head_dim: int, groups: int) -> torch.Tensor:
    """Per o_proj input channel ``[heads * head_dim]`` -> max over each KV head's query heads ``[kv * head_dim]``."""
    return v.view(-1, groups, head_dim).amax(1).reshape(-1)


def _expand_kv_channels(s: torch.Tensor, head_dim: int, groups: int) -> torch.Tensor:
    """Per KV channel ``[kv * head_dim]`` -> per o_proj input channel (query head h reads KV head h // groups)."""
    return s.view(-1, 1, head_dim).expand(-1, groups, head_dim).reshape(-1)


def smooth_model(model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor, *, act_bits: int,
                 act_symmetric: bool, w_spec: QuantSpec | None, h4: torch.Tensor | None,
                 r4_block: int | None = None, shift: bool = True, sites: tuple[str, ...] = SMOOTH_SITES,
                 alphas: tuple[float, ...] = SMOOTH_ALPHAS, max_rows: int = 1024) -> SmoothScales:
    """Choose and fuse the scales on the rotated ``model`` (activation quantizers off); function unchanged.

    ``h4``: the R4 matrix (float64) fused into down_proj (None without R4), ``r4_block`` its block size (None:
    whole)."""
    paths = {"qkv": adapter.q_proj, "gate_up": adapter.gate_proj, "o": adapter.o_proj, "down": adapter.down_proj}
    paths = {k: v for k, v in paths.items() if k in sites}
    rows = _record_inputs(model, adapter, ids, paths, max_rows)
    out = SmoothScales()
    for li, layer in enumerate(adapter.decoder_layers(model)):
        lin = fake_quant.quant_linears(layer, adapter)
        for site in paths:
            x = rows[(li, site)]
            online = site == "down" and h4 is not None
            if site == "down":
                weight = lin[adapter.down_proj].weight.detach().double()
                weight = (weight if h4 is None else weight @ h4.T).float()  # before R4
            elif site == "o":
                weight = lin[adapter.o_proj].weight.detach().float()
            else:
                readers = adapter.attn_readers if site == "qkv" else adapter.mlp_readers
                weight = torch.cat([lin[p].weight.detach().float() for p in readers])
            site_shift = shift and site != "down"
            ref = x @ weight.T
            base = _output_error(x, weight, ref, torch.ones(x.shape[-1], dtype=torch.float64), act_bits, act_symmetric,
                                 w_spec, site_shift, online, r4_block)
            a = (x - x.mean(0)).abs().amax(0).double().clamp_min(1e-8)  # the scale's ranges, once per site
            w = weight.abs().amax(0).double().clamp_min(1e-8)
            if site == "o":  # one scale per KV head's channel: the largest over the query heads that read it
                layout = _o_layout(layer, adapter)
                a, w = _kv_channel_max(a, *layout), _kv_channel_max(w, *layout)
            best, best_err, best_s = None, base, None
            for alpha in alphas:
                s = _scale(a, w, alpha)
                err = _output_error(x, weight, ref, _expand_kv_channels(s, *layout) if site == "o" else s,
                                    act_bits, act_symmetric, w_spec, site_shift, online, r4_block)
                if err < best_err:
                    best, best_err, best_s = alpha, err, s
            key = f"{li}.{site}"
            out.alphas[key], out.error_ratio[key] = best, best_err / base
            if best_s is not None:
                fuse_smoothing(layer, adapter, site, best_s, h4)
    return out


def _divide_rows(lin: nn.Module, s: torch.Tensor) -> None:
    """Divide a linear's output rows (and bias) by ``s`` in float64."""
    with torch.no_grad():
        lin.weight.copy_((lin.weight.detach().double() / s[:, None]).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((lin.bias.detach().double() / s).to(lin.bias.dtype))


def _scale_cols(lin: nn.Module, s: torch.Tensor, transform: torch.Tensor | None = None) -> None:
    """Multiply a linear's input columns by ``s`` in float64 (in the basis before ``transform``, if given)."""
    w = lin.weight.detach().double()
    w = w * s if transform is None else ((w @ transform.T) * s) @ transform
    with torch.no_grad():
        lin.weight.copy_(w.to(lin.weight.dtype))


def fuse_smoothing(layer: nn.Module, adapter: ModelAdapter, site: str, s: torch.Tensor,
                   h4: torch.Tensor | None) -> None:
    """Fuse scale ``s`` at ``site`` of one decoder layer in float64 (``h4``: the R4 already fused into down_proj,
    or None). At ``o`` the scale is per KV-head channel (``[kv_heads * head_dim]``)."""
    s = s.double()
    if site in ("qkv", "gate_up"):
        norm = layer.get_submodule(adapter.attn_norm if site == "qkv" else adapter.mlp_norm)
        with torch.no_grad():
            norm.weight.copy_((norm.weight.detach().double() / s).to(norm.weight.dtype))
        for path in adapter.attn_readers if site == "qkv" else adapter.mlp_readers:
            _scale_cols(layer.get_submodule(path), s)
    elif site == "o":
        _divide_rows(layer.get_submodule(adapter.v_proj), s)
        _scale_cols(layer.get_submodule(adapter.o_proj), _expand_kv_channels(s, *_o_layout(layer, adapter)))
    else:
        _divide_rows(layer.get_submodule(adapter.up_proj), s)
        _scale_cols(layer.get_submodule(adapter.down_proj), s, None if h4 is None else h4.double())
