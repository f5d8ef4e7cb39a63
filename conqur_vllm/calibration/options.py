"""The one options object of a calibration run (CLI flags and the Python API map onto it)."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from conqur_vllm.gptq import GPTQ_DAMP, TARGET_DAMP


class ConqurOptions(BaseModel):
    """Knobs of the ConQuR rotation learner (defaults chosen by measurement, see benchmarks/RESULTS.md)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=8, ge=0, description="online mini-batch updates of the rotations")
    batch_size: int = Field(default=4, ge=1, description="sequences per online mini-batch")
    alternations: int = Field(default=3, ge=1, description="corner/Procrustes alternations per mini-batch")
    accumulate: Literal["sum", "ema"] = "sum"
    ema_decay: float = Field(default=0.5, gt=0.0, lt=1.0)
    weight_mu: float = Field(default=2.0, ge=0.0, description="weight of reader weight rows in the R1 objective")
    learn_r2: bool = True
    quantized_forward: bool | None = Field(
        default=None, description="learn through the fake-quantized model; None: only with RTN weights "
                                  "(GPTQ: the full-precision forward won over 3 selection seeds)")
    max_vectors: int = Field(default=32768, ge=256, description="R1 site vectors sampled per update (memory cap)")
    massive_token_weight: float = Field(default=1.0, gt=0.0, description="weight of tokens > 8x median norm")
    select: Literal["last", "heldout"] = Field(
        default="last", description="last: keep the rotations of the last update; heldout: keep the update (the "
                                    "start included) whose fake-quantized model has the least loss on held-out "
                                    "calibration windows")
    select_windows: int = Field(default=2, ge=1, description="held-out calibration windows scored per update")
    center: bool | None = Field(
        default=None, description="R1 sites: align each normalized residual input minus its mean over the mini-batch "
                                  "(what an a_shift quantizer reads) with the corners; None: as a_shift")
    target: Literal["corner", "grid"] = Field(
        default="corner", description="corner: sign(z)/sqrt(d) (the ConQuR rule); grid: the quantizer's INT grid")


class CalibrationOptions(BaseModel):
    """Everything that decides a checkpoint's content (also the resume fingerprint)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["conqur", "quarot", "none"] = "conqur"
    w_bits: Literal[4, 8, 16] = 4
    a_bits: Literal[4, 8, 16] = 4
    kv_bits: Literal[4, 8, 16] = 4
    weight_quantizer: Literal["gptq", "rtn"] = "gptq"
    group_size: int | None = None
    weight_symmetric: bool | None = Field(
        default=None, description="symmetric INT weight codes; False: a zero point per output channel (group), "
                                  "4-bit weights only; None (measured default): symmetric for GPTQ, asymmetric "
                                  "for 4-bit RTN")
    gptq_inputs: Literal["fp-activations", "quantized", "asymmetric"] = Field(
        default="asymmetric",
        description="what GPTQ's Hessians see: fp-activations (activation/KV quantization off, as in QuaRot), "
                    "quantized (the served model's inputs), asymmetric (measured default: those inputs, aiming "
                    "at the full-precision model's outputs)")
    gptq_target_damp: float = Field(
        default=TARGET_DAMP, gt=0.0, description="asymmetric GPTQ: ridge weight (x mean diag H) keeping the target weight "
                                         "near the original where the calibration inputs say little")
    gptq_residual_target: bool | None = Field(
        default=None, description="asymmetric GPTQ: the writers (o_proj, down_proj) also aim at the residual "
                                  "stream's accumulated error (full-precision minus quantized), pulling the quantized "
                                  "stream back; None (measured default): on with asymmetric inputs")
    gptq_damp: float = Field(
        default=GPTQ_DAMP, gt=0.0, description="GPTQ's damping of each decoder linear's Hessian (x mean diag H) "
                                               "before its column sweep")
    embed_bits: Literal[4, 8, 16] = 4
    head_bits: Literal[4, 8, 16] = 4
    vocab_group_size: int | None = Field(default=32, gt=0, description="group of 4-bit embedding/head weights")
    clip_search: bool = True
    a_clip: Annotated[float, Field(gt=0.0, le=1.0)] | Literal["auto"] = Field(
        default="auto", description="activation clip ratio; auto (measured default): the grid ratio with the "
                                    "least quantization error on calibration data")
    layer_clips: bool | None = Field(
        default=None, description="also choose one activation clip ratio per layer and input group, by the relative "
                                  "output error of the group's linears on calibration tokens (a_clip stays the "
                                  "fallback); None (measured default): on when a_clip is auto, except for QuaRot "
                                  "with GPTQ (worse there on both texts)")
    a_shift: bool = Field(
        default=True, description="quantize the q/k/v, o_proj and gate/up inputs around their calibration mean "
                                  "(served as a shift before the quantizer and a bias after the GEMM)")
    a_symmetric: bool = Field(
        default=False, description="symmetric per-token activation codes; False (measured default): a zero point "
                                   "per token, the GEMM subtracting scale * zero * (row sums of W)")
    smooth: Literal["none", "down", "writers", "all"] | None = Field(
        default=None, description="per-channel smoothing scales chosen per layer on calibration data and fused into "
                                  "the model: down: the down_proj input (before R4); writers: also the o_proj input "
                                  "(through v_proj's rows); all: also the q/k/v and gate/up inputs (through the "
                                  "RMSNorm weights); None (measured default): down for 4-bit "
                                  "activations, except none for QuaRot with GPTQ (worse there on every reported "
                                  "seed); none for 8-bit activations (worse on the seed measured)")
    kv_clip: float = Field(default=0.95, gt=0.0, le=1.0)
    kv_shift: bool = Field(
        default=True, description="subtract each layer's calibration-mean key (after RoPE and R3) before the KV "
                                  "quantizer; exact for attention, which ignores a constant key offset")
    samples: int = Field(default=32, ge=1)
    seq_len: int = Field(default=512, ge=16)
    calib_text: str = "c4"
    seed: int = 0
    r4_block: int | None = None
    device: str = Field(default="cpu", description="where the per-layer weight quantization runs, one decoder "
                                                  "layer at a time (cpu, cuda, cuda:N); the other stages run "
                                                  "where the model was loaded")
    conqur: ConqurOptions = ConqurOptions()

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        try:
            device = torch.device(value)
        except RuntimeError:
            raise ValueError(f"unknown device {value!r}; use cpu or cuda") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {value!r} is not supported; use cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("no CUDA device is visible to torch; use cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{value} does not exist ({torch.cuda.device_count()} CUDA devices visible)")
        return value

    @model_validator(mode="after")
    def _resolve_forward(self) -> CalibrationOptions:
        """``conqur.quantized_forward=None`` becomes True for RTN weights and False for GPTQ, ``weight_symmetric=None``
        False for 4-bit RTN weights only, ``smooth=None`` down for 4-bit activations except for QuaRot with GPTQ, ``layer_clips=None`` on with an
        automatic ``a_clip`` except for QuaRot with GPTQ, ``gptq_residual_target=None`` on with asymmetric GPTQ
        inputs, ``conqur.center=None``
        follows ``a_shift`` (measured defaults)."""
        if self.conqur.quantized_forward is None:
            forward = self.weight_quantizer == "rtn"
            self.conqur = self.conqur.model_copy(update={"quantized_forward": forward})
        if self.weight_symmetric is None:  # measured: a zero point helps RTN a lot and GPTQ not at all
            self.weight_symmetric = not (self.weight_quantizer == "rtn" and self.w_bits == 4)
        elif not self.weight_symmetric and self.w_bits != 4:
            raise ValueError(f"asymmetric weights need w_bits=4 (got {self.w_bits}): their centered codes must fit "
                             "int8; use weight_symmetric=True")
        if self.smooth is None:  # measured: helps 4-bit activations of ConQuR (both quantizers) and QuaRot RTN
            worse = (self.method == "quarot" and self.weight_quantizer == "gptq") or self.a_bits != 4
            self.smooth = "none" if worse else "down"
        if self.layer_clips is None:  # measured: per-input ratios beat the model-wide one, except for QuaRot + GPTQ
            self.layer_clips = self.a_clip == "auto" and not (self.method == "quarot" and self.weight_quantizer == "gptq")
        if self.gptq_residual_target is None:  # measured: see benchmarks/RESULTS.md
            self.gptq_residual_target = self.gptq_inputs == "asymmetric"
        elif self.gptq_residual_target and self.gptq_inputs != "asymmetric":
            raise ValueError(f"gptq_residual_target needs gptq_inputs='asymmetric' (got {self.gptq_inputs!r}); "
                             "drop the residual target or use asymmetric inputs")
        if self.conqur.center is None:  # measured: with shifted inputs, centered corners win on every seed
            self.conqur = self.conqur.model_copy(update={"center": self.a_shift and self.a_bits < 16})
        return self

    def fingerprint(self, source: str) -> str:
        """Hash of the options and the source model, to refuse resuming a different run."""
        payload = json.dumps({"options": self.model_dump(exclude={"device"}), "source": source}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
