"""Layer-by-layer weight quantization (GPTQ or RTN) of a model wrapped by :mod:`conqur_vllm.fake_quant`.

Only one decoder layer is on the compute device at a time; the calibration batch's hidden states are the only
activations kept (one tensor per mini-batch, replaced layer by layer). GPTQ Hessians are accumulated from the
inputs the weights multiply (after online transforms, before activation quantization, as in QuaRot), and the
next layer sees the outputs of the weight-quantized layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from conqur_vllm import fake_quant
from conqur_vllm.gptq import HessianAccumulator, gptq_quantize
from conqur_vllm.models.adapters import ModelAdapter
from conqur_vllm.quant import QuantizedTensor, QuantSpec, dequantize, quantize_weight_rtn


@dataclass
class LayerReport:
    """One line of per-layer progress."""

    layer: int
    seconds: float
    output_rel_error: float | None  # |y_q - y_fp| / |y_fp| of the layer on the calibration batch (GPTQ only)

    def line(self) -> str:
        err = "" if self.output_rel_error is None else f" out_rel_err={self.output_rel_error:.4f}"
        return f"layer {self.layer:3d}: {self.seconds:6.2f}s{err}"


class _StopForward(Exception):
    pass


def capture_layer_inputs(model: nn.Module, adapter: ModelAdapter, batches: list[torch.Tensor],
                         device: torch.device) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering decoder layer 0 for each batch, and the keyword arguments the layers receive."""
    layers = adapter.decoder_layers(model)
    captured: list[torch.Tensor] = []
    kwargs_seen: dict = {}

    def hook(_module, args, kwargs):
        captured.append(args[0].detach() if args else kwargs.pop("hidden_states").detach())
        kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    kwargs_seen["use_cache"] = False
    if isinstance(kwargs_seen.get("position_embeddings"), tuple):  # same positions in every batch: broadcast
        kwargs_seen["position_embeddings"] = tuple(t[:1] for t in kwargs_seen["position_embeddings"])
    if isinstance(kwargs_seen.get("position_ids"), torch.Tensor):
        kwargs_seen["position_ids"] = kwargs_seen["position_ids"][:1]
    kwargs_seen.pop("past_key_values", None)
    kwargs_seen.pop("past_key_value", None)
    return captured, kwargs_seen


def _layer_forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def quantize_layer_weights(layer: nn.Module, adapter: ModelAdapter, spec: QuantSpec, *, method: str,
                           hessians: dict[str, HessianAccumulator] | None, clip_search: bool
                           ) -> dict[str, QuantizedTensor]:
    """Quantize every linear of one layer in place (weights become their dequantized values).

    Linears that share an input (q/k/v, gate/up) share one Hessian; GPTQ treats rows independently given H,
    so they are quantized as one stacked matrix.
    """
    result = {}
    qlins = fake_quant.quant_linears(layer, adapter)
    for group in adapter.input_groups:
        weights = [qlins[p].linear.weight for p in group]
        stacked = torch.cat([w.detach() for w in weights]).to(torch.float64)
        if method == "gptq":
            qt = gptq_quantize(stacked, hessians[group[0]].hessian, spec, clip_search=clip_search)
        else:
            qt = quantize_weight_rtn(stacked.float(), spec, clip_search=clip_search)
        start = 0
        for path, w in zip(group, weights):
            rows = slice(start, start + w.shape[0])
            start += w.shape[0]
            part = QuantizedTensor(qt.q[rows].contiguous(), qt.scale[rows].contiguous(),
                                   None if qt.zero is None else qt.zero[rows].contiguous(), qt.spec)
            with torch.no_grad():
                w.copy_(dequantize(part, torch.float64).to(w.dtype))
            result[path] = part
    return result


def quantize_weights(model: nn.Module, adapter: ModelAdapter, spec: QuantSpec, *, method: str = "gptq",
                     calib_batches: list[torch.Tensor] | None = None, clip_search: bool = True,
                     device: torch.device | str = "cpu", progress: bool = True,
                     on_layer: Callable[[int, dict[str, QuantizedTensor], LayerReport, list | None], None] | None = None,
                     start_layer: int = 0, resume_hidden: list[torch.Tensor] | None = None,
                     ) -> dict[str, QuantizedTensor]:
    """Quantize every decoder linear; returns ``{"<layers>.<i>.<path>": QuantizedTensor}``.

    ``on_layer`` is called after each layer (for checkpointing progress); ``start_layer``/``resume_hidden`` resume
    a GPTQ run whose earlier layers are already quantized in ``model``.
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"weight quantizer {method!r} is unknown; use 'gptq' or 'rtn'")
    device = torch.device(device)
    layers = adapter.decoder_layers(model)
    out: dict[str, QuantizedTensor] = {}
    saved_act = {m: m.act for m in model.modules() if isinstance(m, fake_quant.QuantLinear)}
    saved_attn = [layer.get_submodule(adapter.attention).conqur_attention for layer in layers]
    fake_quant.set_activation_quant(model, fake_quant.ActQuant(bits=None))
    for i, layer in enumerate(layers):
        att = saved_attn[i]
        layer.get_submodule(adapter.attention).conqur_attention = fake_quant.AttentionSim(r3=att.r3)
    try:
        hidden, kwargs = None, {}
        if method == "gptq":
            if not calib_batches:
                raise ValueError("GPTQ needs calibration batches; pass calib_batches or use method='rtn'")
            with torch.no_grad():
                hidden, kwargs = capture_layer_inputs(model, adapter, calib_batches[:1] if resume_hidden
                                                      else calib_batches, device)
                if resume_hidden is not None:
                    hidden = resume_hidden
        bar = tqdm(range(start_layer, len(layers)), desc=f"{method} layers", disable=not progress)
        for li in bar:
            t0 = time.perf_counter()
            layer = layers[li].to(device)
            hessians, err = None, None
            if method == "gptq":
                hessians, fp_out = _collect_hessians(layer, adapter, hidden, kwargs)
            qts = quantize_layer_weights(layer, adapter, spec, method=method, hessians=hessians,
                                         clip_search=clip_search)
            if method == "gptq":
                with torch.no_grad():
                    hidden = [_layer_forward(layer, h, kwargs) for h in hidden]
                num = sum(float((h - f).pow(2).sum()) for h, f in zip(hidden, fp_out))
                den = sum(float(f.pow(2).sum()) for f in fp_out)
                err = (num / den) ** 0.5
            prefix = f"{adapter.layers}.{li}"
            out.update({f"{prefix}.{path}": qt for path, qt in qts.items()})
            report = LayerReport(li, time.perf_counter() - t0, err)
            if progress:
                bar.write(report.line())
            if on_layer is not None:
                on_layer(li, {f"{prefix}.{p}": qt for p, qt in qts.items()}, report, hidden)
            if device.type != "cpu":
                layers[li].to("cpu")
    finally:
        for m, act in saved_act.items():
            m.act = act
        for layer, att in zip(layers, saved_attn):
            layer.get_submodule(adapter.attention).conqur_attention = att
    return out


def _collect_hessians(layer: nn.Module, adapter: ModelAdapter, hidden: list[torch.Tensor], kwargs: dict
                      ) -> tuple[dict[str, HessianAccumulator], list[torch.Tensor]]:
    """One Hessian per input group (keyed by the group's first linear) and the layer's full-precision outputs."""
    qlins = fake_quant.quant_linears(layer, adapter)
    accs = {}
    for group in adapter.input_groups:
        qlin = qlins[group[0]]
        accs[group[0]] = acc = HessianAccumulator(qlin.linear.in_features, device=qlin.linear.weight.device)
        qlin.input_observer = acc.add  # the transformed input, computed once for the forward and the Hessian
    try:
        with torch.no_grad():
            fp_out = [_layer_forward(layer, h, kwargs) for h in hidden]
    finally:
        for group in adapter.input_groups:
            qlins[group[0]].input_observer = None
    return accs, fp_out
