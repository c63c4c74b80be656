"""Turning diffusion UNets into ADP-DM INT8 builds: model loading, ONNX export, the `adpdm` CLI."""

__version__ = "0.1.0"
