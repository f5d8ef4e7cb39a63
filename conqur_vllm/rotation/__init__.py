"""Rotations of a decoder (R1-R4) and their fusion."""

from conqur_vllm.rotation.rotations import Rotations, apply_rotations, quarot_rotations

__all__ = ["Rotations", "apply_rotations", "quarot_rotations"]
