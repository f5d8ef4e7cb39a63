"""Streaming calibration: rotations, weight quantization, checkpoint export."""
