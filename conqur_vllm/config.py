"""The checkpoint contract: the versioned ``quantization_config`` schema in ``config.json``.

The calibrator writes a checkpoint only through :class:`ConqurQuantConfig` and the vLLM plugin reads it only
through the same class. Unknown fields or an unknown version are rejected with a one-line error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1
QUANT_METHOD = "conqur"


class CheckpointConfigError(ValueError):
    """A checkpoint's quantization_config cannot be used; the message says what and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightQuantArgs(_Strict):
    """INT weights, stored packed (compressed-tensors ``pack-quantized``: 8 nibbles per int32).

    ``symmetric: false`` (4-bit only): unsigned codes with a zero point per output channel (or group), stored as
    ``weight_zero_point``; the served GEMM reads the centered codes ``q - zero`` in [-15, 15] as int8.
    """

    num_bits: Literal[4, 8] = 4
    symmetric: bool = True
    group_size: int | None = Field(default=None, description="None = one scale per output channel")
    quantizer: Literal["gptq", "rtn"] = "gptq"
    clip_search: bool = True
    format: Literal["pack-quantized"] = "pack-quantized"

    @model_validator(mode="after")
    def _check(self) -> WeightQuantArgs:
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"weights.group_size must be positive or null, got {self.group_size}")
        if not self.symmetric and self.num_bits != 4:
            raise ValueError(f"weights.symmetric false needs num_bits 4, got {self.num_bits}: centered 8-bit codes "
                             "do not fit int8; recalibrate with symmetric weights")
        return self


ShiftGroup = Literal["qkv", "o_proj", "gate_up", "down_proj"]
_GROUPS = frozenset(get_args(ShiftGroup))
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Linear names (Hugging Face and vLLM's merged ones) -> the input group they read.
LINEAR_INPUT_GROUP: dict[str, str] = {
    "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "qkv_proj": "qkv", "o_proj": "o_proj",
    "gate_proj": "gate_up", "up_proj": "gate_up", "gate_up_proj": "gate_up", "down_proj": "down_proj",
}


class ActivationQuantArgs(_Strict):
    """Dynamic per-token activation quantization at every decoder linear input: symmetric, or asymmetric with a
    zero point per token (``symmetric: false``; the served GEMM subtracts ``scale * zero * sum_k W[n, k]``)."""

    num_bits: Literal[4, 8, 16] = 4
    symmetric: bool = True
    granularity: Literal["token"] = "token"
    dynamic: Literal[True] = True
    clip_ratio: float = Field(default=0.9, gt=0.0, le=1.0)
    input_clip_ratios: dict[str, float] = Field(
        default_factory=dict, description="per decoder layer and input group, ``\"{layer}.{group}\"`` (group as in "
                                          "shifted_inputs) -> the clip ratio of that input; clip_ratio elsewhere")
    shifted_inputs: tuple[ShiftGroup, ...] = Field(
        default=(), description="input groups whose linears store a float32 ``input_shift`` mu: the quantizer reads "
                                "x - mu and the GEMM output gets W mu added (qkv, o_proj, gate_up, down_proj)")

    @model_validator(mode="after")
    def _check_input_clips(self) -> ActivationQuantArgs:
        for key, ratio in self.input_clip_ratios.items():
            layer, _, group = key.partition(".")
            if not layer.isdigit() or group not in _GROUPS:
                raise ValueError(f"input_clip_ratios key {key!r} is not '<layer>.<group>' with group one "
                                 f"of {sorted(_GROUPS)}; rewrite the checkpoint with `conqur calibrate`")
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"input_clip_ratios[{key!r}] is {ratio}, not in (0, 1]")
        return self


class KVCacheQuantArgs(_Strict):
    """KV cache quantization, per token and per head (group = head_dim unless group_size says otherwise)."""

    num_bits: Literal[4, 8, 16] = 4
    symmetric: bool = False
    group_size: int | None = None
    clip_ratio: float = Field(default=0.95, gt=0.0, le=1.0)
    key_shift: bool = Field(
        default=False, description="every attention layer stores a float32 ``attn.k_shift`` [kv_heads * head_dim], "
                                   "subtracted from the keys after RoPE and R3, before the cache (softmax ignores it)")


class VocabQuantArgs(_Strict):
    """Weight-only symmetric INT quantization of the token embedding and the LM head (RTN with clip search).

    Bits 16 leaves that matrix in the model dtype. ``group_size`` (columns per scale) applies to 4-bit
    matrices; 8-bit ones have one scale per row.
    """

    embed_bits: Literal[4, 8, 16] = 4
    head_bits: Literal[4, 8, 16] = 8
    group_size: int | None = 32
    embed_module: str = "model.embed_tokens"
    head_module: str = "lm_head"

    @model_validator(mode="after")
    def _check(self) -> VocabQuantArgs:
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"vocab.group_size must be positive or null, got {self.group_size}")
        return self

    def group_for(self, bits: int) -> int | None:
        return self.group_size if bits == 4 else None


class OnlineTransform(_Strict):
    """A rotation applied at run time (its inverse is already fused into the neighbouring weights).

    ``site``: ``down_proj_input`` (R4, before down_proj) or ``qk_post_rope`` (R3, on Q and K after RoPE).
    ``size`` is the transformed dimension; ``block`` the size of each diagonal block for a block-diagonal
    Hadamard (None = one block of ``size``), so that tensor-parallel shards never straddle a block.
    """

    site: Literal["down_proj_input", "qk_post_rope"]
    kind: Literal["hadamard"] = "hadamard"
    size: int = Field(gt=0)
    block: int | None = None

    @model_validator(mode="after")
    def _check(self) -> OnlineTransform:
        if self.block is not None and (self.block <= 0 or self.size % self.block):
            raise ValueError(f"transform block {self.block} must divide size {self.size}")
        return self

    @property
    def block_size(self) -> int:
        return self.block or self.size


class CalibrationProvenance(_Strict):
    """Where the rotations and weights came from."""

    method: Literal["conqur", "quarot", "none"]
    weight_quantizer: Literal["gptq", "rtn"]
    samples: int = 0
    seq_len: int = 0
    dataset: str = ""
    seed: int = 0
    source_model: str = ""
    tool_version: str = ""
    created: str = ""


class ConqurQuantConfig(_Strict):
    """``config.json["quantization_config"]`` of a conqur-vllm checkpoint."""

    quant_method: Literal["conqur"] = QUANT_METHOD
    version: int = SCHEMA_VERSION
    method: Literal["conqur", "quarot", "none"] = "conqur"
    weights: WeightQuantArgs = WeightQuantArgs()
    activations: ActivationQuantArgs = ActivationQuantArgs()
    kv_cache: KVCacheQuantArgs = KVCacheQuantArgs()
    online_transforms: tuple[OnlineTransform, ...] = ()
    ignore: tuple[str, ...] = ("lm_head",)
    vocab: VocabQuantArgs | None = None
    calibration: CalibrationProvenance | None = None

    @model_validator(mode="after")
    def _check_version(self) -> ConqurQuantConfig:
        if self.version != SCHEMA_VERSION:
            raise ValueError(
                f"checkpoint schema version {self.version} is not supported (this conqur-vllm reads version "
                f"{SCHEMA_VERSION}); re-run `conqur calibrate` or upgrade conqur-vllm"
            )
        return self

    def packed_weight_args(self, prefix: str) -> tuple[int, int | None]:
        """(bits, group size) of the packed weight stored under ``prefix`` (a linear, the embedding or the head)."""
        if self.vocab is not None:
            if prefix == self.vocab.embed_module:
                return self.vocab.embed_bits, self.vocab.group_for(self.vocab.embed_bits)
            if prefix == self.vocab.head_module:
                return self.vocab.head_bits, self.vocab.group_for(self.vocab.head_bits)
        return self.weights.num_bits, self.weights.group_size

    def is_vocab_module(self, prefix: str) -> bool:
        """Whether ``prefix`` is the packed embedding or LM head (always symmetric, with their own bits)."""
        return self.vocab is not None and prefix in (self.vocab.embed_module, self.vocab.head_module)

    def has_input_shift(self, prefix: str) -> bool:
        """Whether the linear at ``prefix`` (e.g. ``model.layers.0.self_attn.qkv_proj``) stores an input_shift."""
        group = LINEAR_INPUT_GROUP.get(prefix.rsplit(".", 1)[-1])
        return self.activations.num_bits < 16 and group in self.activations.shifted_inputs

    def clip_ratio_for(self, prefix: str) -> float:
        """The activation clip ratio of the linear at ``prefix`` (e.g. ``model.layers.3.mlp.gate_up_proj``)."""
        match = _LAYER_INDEX.search(prefix)
        group = LINEAR_INPUT_GROUP.get(prefix.rsplit(".", 1)[-1])
        if match is None or group is None:
            return self.activations.clip_ratio
        return self.activations.input_clip_ratios.get(f"{match.group(1)}.{group}", self.activations.clip_ratio)

    def transform(self, site: str) -> OnlineTransform | None:
        """The online transform at ``site``, or None."""
        return next((t for t in self.online_transforms if t.site == site), None)

    # --- (de)serialization -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> ConqurQuantConfig:
        """Validate a ``quantization_config`` dict; any problem becomes one CheckpointConfigError line."""
        if data.get("quant_method") != QUANT_METHOD:
            raise CheckpointConfigError(
                f"quantization_config.quant_method is {data.get('quant_method')!r}, expected 'conqur'; "
                "this checkpoint was not written by conqur-vllm"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "quantization_config"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field (written by a newer conqur-vllm? upgrade it, or remove the field)"
            raise CheckpointConfigError(f"quantization_config.{where}: {msg}") from None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ConqurQuantConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointConfigError(f"{path} not found: pass a checkpoint folder written by `conqur calibrate`")
        config = json.loads(path.read_text())
        if "quantization_config" not in config:
            raise CheckpointConfigError(
                f"{path} has no quantization_config: this is not a conqur checkpoint (run `conqur calibrate`)"
            )
        return cls.from_dict(config["quantization_config"])
