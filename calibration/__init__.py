"""ADP-DM calibration in PyTorch: quantizers, the quantization-aware UNet wrapper, data-free
trajectories, timestep-group search, baselines, metrics and `CalibrationResult`.

Middle layer: may import `engines`, never `adpdm_export`; knows nothing of ONNX and takes
module objects, never paths (except the result's own save/load and the trajectory cache).
"""
