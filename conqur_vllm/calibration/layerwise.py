"""Layer-by-layer weight quantization (GPTQ or RTN) of a model wrapped by :mod:`conqur_vllm.fake_quant`.

Only one decoder layer is on the compute device at a time (the rest of the model stays where it was loaded); the
calibration batch's hidden states are the only activations kept (one tensor per mini-batch, replaced layer by
layer, on the compute device); the codes and the states handed to ``on_layer`` come back on the CPU. What
GPTQ's Hessians see is ``GptqInputs``:

- ``fp-activations`` (as in QuaRot): the inputs the weights multiply with activation and KV quantization off;
  each layer reproduces its own outputs on the weight-quantized stream.
- ``quantized``: the inputs the served model feeds the weights (activation and KV quantization on, also in the
  stream between layers), read one input group after another (q/k/v, o_proj, gate/up, down_proj) so each group
  sees the earlier groups quantized; each group reproduces its full-precision weights' outputs on those inputs.
- ``asymmetric`` (the calibrator's default): the same inputs, but the target is the full-precision model's
  output at the same tokens (a second, unquantized stream): GPTQ of ``W (C + lam I)(H + lam I)^-1``
  (:func:`conqur_vllm.gptq.fp_target_weight`), so every group's weights also absorb the activation and upstream
  error they can. With ``residual_target`` the residual writers (o_proj, down_proj) aim at the full-precision
  output plus the residual stream's error at their tokens, so the stream itself is pulled back towards the
  full-precision one after every sublayer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from conqur_vllm import fake_quant
from conqur_vllm.gptq import (
    GPTQ_DAMP,
    TARGET_DAMP,
    CrossAccumulator,
    HessianAccumulator,
    fp_target_weight,
    gptq_quantize,
)
from conqur_vllm.models.adapters import ModelAdapter
from conqur_vllm.quant import QuantizedTensor, QuantSpec, dequantize, quantize_weight_rtn


@dataclass
class LayerReport:
    """One line of per-layer progress."""

    layer: int
    seconds: float
    # GPTQ only: |y_q - y_t| / |y_t| on the calibration batches, y_t = the layer's outputs before its weights were
    # quantized (same inputs) or, for asymmetric GPTQ, the full-precision stream's (the error so far)
    output_rel_error: float | None

    def line(self) -> str:
        err = "" if self.output_rel_error is None else f" out_rel_err={self.output_rel_error:.4f}"
        return f"layer {self.layer:3d}: {self.seconds:6.2f}s{err}"


GptqInputs = Literal["fp-activations", "quantized", "asymmetric"]


class _StopForward(Exception):
    pass


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (where it runs)."""
    return next(module.parameters()).device


def _on_cpu(qt: QuantizedTensor) -> QuantizedTensor:
    return QuantizedTensor(qt.q.cpu(), qt.scale.cpu(), None if qt.zero is None else qt.zero.cpu(), qt.spec)


def capture_layer_inputs(model: nn.Module, adapter: ModelAdapter, batches: list[torch.Tensor],
                         device: torch.device) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering decoder layer 0 for each batch, and the keyword arguments the layers receive, on
    ``device`` (the embedding runs where ``model`` is)."""
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
                model(ids.to(module_device(model)), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    captured = [h.to(device) for h in captured]
    kwargs_seen = send_to_device(kwargs_seen, device)
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
                           hessians: dict[str, HessianAccumulator] | None, clip_search: bool,
                           damp: float = GPTQ_DAMP) -> dict[str, QuantizedTensor]:
    """Quantize every linear of one layer in place (weights become their dequantized values).

    Linears that share an input (q/k/v, gate/up) share one Hessian; GPTQ treats rows independently given H,
    so they are quantized as one stacked matrix.
    """
    result = {}
    for group in adapter.input_groups:
        result.update(quantize_group(layer, adapter, group, spec, method=method,
                                     moments=None if hessians is None else hessians[group[0]],
                                     clip_search=clip_search, damp=damp))
    return result


def quantize_group(layer: nn.Module, adapter: ModelAdapter, group: list[str], spec: QuantSpec, *, method: str,
                   moments: HessianAccumulator | None, clip_search: bool, target_damp: float = TARGET_DAMP,
                   damp: float = GPTQ_DAMP) -> dict[str, QuantizedTensor]:
    """Quantize the linears of one input group in place as one stacked matrix; ``moments`` (GPTQ): their inputs'
    Hessian (damped by ``damp`` x its mean diagonal), with a cross moment (:class:`CrossAccumulator`) for the
    full-precision model's outputs as target (ridge weight ``target_damp``)."""
    qlins = fake_quant.quant_linears(layer, adapter)
    weights = [qlins[p].linear.weight for p in group]
    stacked = torch.cat([w.detach() for w in weights]).to(torch.float64)
    if method == "gptq":
        if isinstance(moments, CrossAccumulator):
            stacked = fp_target_weight(stacked, moments.hessian, moments.cross, damp=target_damp,
                                       residual=moments.residual)
        qt = gptq_quantize(stacked, moments.hessian, spec, clip_search=clip_search, damp=damp)
    else:
        qt = quantize_weight_rtn(stacked.float(), spec, clip_search=clip_search)
    result, start = {}, 0
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
                     inputs: GptqInputs = "fp-activations", target_damp: float = TARGET_DAMP,
                     residual_target: bool = False,
                     damp: float = GPTQ_DAMP, device: torch.device | str = "cpu", progress: bool = True,
                     on_layer: Callable[[int, dict[str, QuantizedTensor], LayerReport, list | None, list | None],
                                        None] | None = None,
                     start_layer: int = 0, resume_hidden: list[torch.Tensor] | None = None,
                     resume_reference: list[torch.Tensor] | None = None,
                     ) -> dict[str, QuantizedTensor]:
    """Quantize every decoder linear; returns ``{"<layers>.<i>.<path>": QuantizedTensor}``.

    ``inputs`` says what GPTQ's Hessians see (module docstring); ``target_damp`` is the asymmetric target's ridge
    weight (:func:`conqur_vllm.gptq.fp_target_weight`), ``damp`` GPTQ's own damping of the Hessian;
    ``residual_target`` (``asymmetric`` only): the writers o_proj and down_proj also aim at the error the
    quantized stream's residual has accumulated, so their outputs pull it back towards the full-precision one.
    ``on_layer(index, qweights, report, hidden, reference)`` is called after each layer (for checkpointing
    progress) with the hidden states leaving it (the stream the next layer's Hessians read) and, for
    ``asymmetric``, the full-precision stream;
    ``start_layer``/``resume_hidden``/``resume_reference`` resume a GPTQ run whose earlier layers are already
    quantized in ``model``.
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"weight quantizer {method!r} is unknown; use 'gptq' or 'rtn'")
    if inputs not in ("fp-activations", "quantized", "asymmetric"):
        raise ValueError(f"GPTQ inputs {inputs!r} are unknown; use 'fp-activations', 'quantized' or 'asymmetric'")
    if residual_target and inputs != "asymmetric":
        raise ValueError(f"residual targets need asymmetric GPTQ inputs (got {inputs!r})")
    if inputs == "asymmetric" and resume_hidden is not None and resume_reference is None:
        raise ValueError("resuming asymmetric GPTQ needs the full-precision stream (resume_reference)")
    device = torch.device(device)
    home = module_device(model)  # where each layer goes back to
    layers = adapter.decoder_layers(model)
    out: dict[str, QuantizedTensor] = {}
    saved = fake_quant.SavedQuantizers.of(model, adapter)
    off_attn = [None if att is None else fake_quant.AttentionSim(r3=att.r3) for att in saved.simulations]

    def quantizers(on: bool) -> None:
        if on:
            saved.use(saved.acts, saved.simulations)
        else:
            saved.use(fake_quant.ActQuant(bits=None), off_attn)

    stream_quantized = method == "gptq" and inputs != "fp-activations"
    quantizers(False)
    try:
        hidden, reference, kwargs = None, None, {}
        if method == "gptq":
            if not calib_batches:
                raise ValueError("GPTQ needs calibration batches; pass calib_batches or use method='rtn'")
            with torch.no_grad():
                hidden, kwargs = capture_layer_inputs(model, adapter, calib_batches[:1] if resume_hidden
                                                      else calib_batches, device)
                if inputs == "asymmetric":
                    reference = (list(hidden) if resume_reference is None
                                 else send_to_device(resume_reference, device))
                if resume_hidden is not None:
                    hidden = send_to_device(resume_hidden, device)
        bar = tqdm(range(start_layer, len(layers)), desc=f"{method} layers", disable=not progress)
        for li in bar:
            t0 = time.perf_counter()
            layer = layers[li].to(device)
            hessians, err, target = None, None, None
            if method == "gptq" and stream_quantized:
                qts, target, hidden = _gptq_layer_sequential(layer, adapter, spec, hidden, reference, kwargs,
                                                             quantizers, clip_search, target_damp, damp,
                                                             residual_target=residual_target)
            else:
                if method == "gptq":
                    hessians, target = _collect_hessians(layer, adapter, hidden, kwargs)
                qts = quantize_layer_weights(layer, adapter, spec, method=method, hessians=hessians,
                                             clip_search=clip_search, damp=damp)
            if method == "gptq":
                if not stream_quantized:
                    quantizers(False)
                    with torch.no_grad():
                        hidden = [_layer_forward(layer, h, kwargs) for h in hidden]
                if reference is not None:
                    reference = target
                num = sum(float((h - f).pow(2).sum()) for h, f in zip(hidden, target))
                den = sum(float(f.pow(2).sum()) for f in target)
                err = (num / den) ** 0.5
            prefix = f"{adapter.layers}.{li}"
            qts = {f"{prefix}.{path}": _on_cpu(qt) for path, qt in qts.items()}
            out.update(qts)
            report = LayerReport(li, time.perf_counter() - t0, err)
            if progress:
                bar.write(report.line())
            if on_layer is not None:
                on_layer(li, qts, report, send_to_device(hidden, torch.device("cpu")),
                         send_to_device(reference, torch.device("cpu")))
            if device != home:
                layers[li].to(home)
    finally:
        saved.restore()
    return out


def _collect_hessians(layer: nn.Module, adapter: ModelAdapter, hidden: list[torch.Tensor], kwargs: dict
                      ) -> tuple[dict[str, HessianAccumulator], list[torch.Tensor]]:
    """One Hessian per input group (keyed by the group's first linear) and the layer's outputs before its weights
    are quantized (with the quantizers as they are set)."""
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


def _stopping_observer(moments: HessianAccumulator, reference: torch.Tensor | None,
                       residual_error: Callable[[], torch.Tensor] | None = None) -> Callable:
    """Fold the observed input (paired with ``reference``, when given, and with the residual stream's error that
    ``residual_error()`` returns at that moment) into ``moments``, then stop the forward: nothing after this
    input is needed."""
    def observe(x: torch.Tensor) -> None:
        if reference is None:
            moments.add(x)
        else:
            moments.add_pair(reference, x, None if residual_error is None else residual_error())
        raise _StopForward
    return observe


class SublayerReplay:
    """A sublayer's output rebuilt from the recorded inputs of its last linear (its writer), one per batch.

    Once the linears before the writer are quantized, what reaches the writer no longer changes, so later
    passes through the layer need only the writer of it: while replaying, the sublayer returns
    ``writer(raw[batch])`` (for the attention ``(writer(raw[batch]), None)``), the same operations on the same
    tensors as its own last step, without recomputing what came before. Llama, Qwen2/3 and Mistral attention
    and MLP blocks all end that way (tested).
    """

    def __init__(self, layer: nn.Module, sublayer: str, writer: str, as_tuple: bool) -> None:
        self.sublayer = layer.get_submodule(sublayer)
        self.writer = layer.get_submodule(writer)
        self.as_tuple = as_tuple
        self.raw: list[torch.Tensor] = []
        self.batch = 0

    @classmethod
    def attention(cls, layer: nn.Module, adapter: ModelAdapter) -> SublayerReplay:
        return cls(layer, adapter.attention, adapter.o_proj, as_tuple=True)

    @classmethod
    def mlp(cls, layer: nn.Module, adapter: ModelAdapter) -> SublayerReplay:
        return cls(layer, adapter.down_proj.rsplit(".", 1)[0], adapter.down_proj, as_tuple=False)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Keep the writer's input of every forward (in batch order)."""
        handle = self.writer.register_forward_pre_hook(lambda _m, args: self.raw.append(args[0].detach()))
        try:
            yield
        finally:
            handle.remove()

    def _replayed(self, *_args, **_kwargs):
        out = self.writer(self.raw[self.batch])
        return (out, None) if self.as_tuple else out

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """The sublayer returns the writer's output on the recorded input of batch ``self.batch``."""
        self.sublayer.forward = self._replayed
        try:
            yield
        finally:
            del self.sublayer.forward


@contextmanager
def _recording_mlp_residual(layer: nn.Module, adapter: ModelAdapter, into: list[torch.Tensor]) -> Iterator[None]:
    """Append the residual stream entering the MLP (the input of its norm, which down_proj's output joins) at
    every forward of ``layer``."""
    norm = layer.get_submodule(adapter.mlp_norm)
    handle = norm.register_forward_pre_hook(lambda _m, args: into.append(args[0].detach()))
    try:
        yield
    finally:
        handle.remove()


def _residual_error(writer: str, adapter: ModelAdapter, input_reference: torch.Tensor, input_quantized: torch.Tensor,
                    mid_reference: torch.Tensor, mid_quantized: list[torch.Tensor]) -> Callable[[], torch.Tensor] | None:
    """The residual error a writer's output joins, computed only when its input is observed: the layer inputs'
    for o_proj, that of the residual entering the MLP (recorded moments before, in this forward) for down_proj;
    None for the other groups."""
    if writer == adapter.o_proj:
        return lambda: input_reference - input_quantized
    if writer == adapter.down_proj:
        return lambda: mid_reference - mid_quantized.pop()
    return None


def _gptq_layer_sequential(layer: nn.Module, adapter: ModelAdapter, spec: QuantSpec, hidden: list[torch.Tensor],
                           reference: list[torch.Tensor] | None, kwargs: dict, quantizers: Callable[[bool], None],
                           clip_search: bool, target_damp: float = TARGET_DAMP, damp: float = GPTQ_DAMP,
                           residual_target: bool = False
                           ) -> tuple[dict[str, QuantizedTensor], list[torch.Tensor], list[torch.Tensor]]:
    """GPTQ of one layer on the quantized stream, one input group after another (each group's inputs are read
    with the groups before it already quantized, so o_proj and down_proj see what they will be fed).

    With ``reference`` (asymmetric): the full-precision stream first runs through the layer's full-precision
    weights, quantizers off, keeping every group's inputs (per batch) and the outputs, the target; each group
    then aims at the full-precision outputs of its inputs. Without: the target is the layer's outputs before
    quantization on the quantized stream. Passes after o_proj's replay the attention, and the pass for the
    next layer's inputs the MLP as well (:class:`SublayerReplay`).
    With ``residual_target`` (needs ``reference``) the writers' targets add the residual stream's error at the
    tokens they write to (full-precision minus quantized: the layer inputs for o_proj, the residual entering the
    MLP for down_proj), so the quantized stream leaves each sublayer as close to the full-precision one as the
    writer can bring it.
    Returns the codes, the target outputs and the quantized layer's outputs (the next layer's inputs)."""
    qlins = fake_quant.quant_linears(layer, adapter)
    heads = [group[0] for group in adapter.input_groups]
    kept: dict[str, list[torch.Tensor]] = {p: [] for p in heads}
    residual_errors = residual_target and reference is not None
    mid_reference: list[torch.Tensor] = []  # the full-precision residual entering the MLP, per batch
    try:
        if reference is not None:
            for p in heads:
                qlins[p].input_observer = kept[p].append
        quantizers(reference is None)
        with ExitStack() as stack, torch.no_grad():
            if residual_errors:
                stack.enter_context(_recording_mlp_residual(layer, adapter, mid_reference))
            target = [_layer_forward(layer, r, kwargs) for r in (reference if reference is not None else hidden)]
    finally:
        for p in heads:
            qlins[p].input_observer = None
    quantizers(True)
    result: dict[str, QuantizedTensor] = {}
    attention, mlp = SublayerReplay.attention(layer, adapter), SublayerReplay.mlp(layer, adapter)
    replays = (attention, mlp)
    for group in adapter.input_groups:
        head = qlins[group[0]]
        moments = (CrossAccumulator if reference is not None else HessianAccumulator)(
            head.linear.in_features, device=head.linear.weight.device)
        mid_quantized: list[torch.Tensor] = []
        with ExitStack() as stack:
            if attention.raw:  # q/k/v are quantized and o_proj's inputs recorded
                stack.enter_context(attention.replaying())
            for replay, writer in ((attention, adapter.o_proj), (mlp, adapter.down_proj)):
                if group[0] == writer:
                    stack.enter_context(replay.recording())
            if residual_errors and group[0] == adapter.down_proj:
                stack.enter_context(_recording_mlp_residual(layer, adapter, mid_quantized))
            for b, h in enumerate(hidden):
                for replay in replays:
                    replay.batch = b
                error = (_residual_error(group[0], adapter, reference[b], h, mid_reference[b], mid_quantized)
                         if residual_errors else None)
                head.input_observer = _stopping_observer(moments,
                                                         kept[group[0]][b] if reference is not None else None,
                                                         error)
                try:
                    with torch.no_grad():
                        _layer_forward(layer, h, kwargs)
                except _StopForward:
                    pass
                finally:
                    head.input_observer = None
        kept[group[0]].clear()
        result.update(quantize_group(layer, adapter, group, spec, method="gptq", moments=moments,
                                     clip_search=clip_search, target_damp=target_damp, damp=damp))
    outputs = []
    with attention.replaying(), mlp.replaying(), torch.no_grad():
        for b, h in enumerate(hidden):
            attention.batch = mlp.batch = b
            outputs.append(_layer_forward(layer, h, kwargs))
    return result, target, outputs
