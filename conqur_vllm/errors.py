"""Errors that mean 'fix your input': the CLI prints them as one line instead of a traceback."""

from __future__ import annotations

from conqur_vllm.assets import AssetError
from conqur_vllm.calibration.pipeline import CalibrationError
from conqur_vllm.calibration.resume import ResumeError
from conqur_vllm.config import CheckpointConfigError
from conqur_vllm.hadamard import UnsupportedHadamardSize
from conqur_vllm.models.adapters import UnsupportedArchitecture

USER_ERRORS: tuple[type[BaseException], ...] = (
    AssetError,
    CalibrationError,
    ResumeError,
    CheckpointConfigError,
    UnsupportedHadamardSize,
    UnsupportedArchitecture,
    FileExistsError,
    FileNotFoundError,
)
