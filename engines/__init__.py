"""Running a diffusion UNet: schedulers, the sampler, backends, the timestep-dispatching runner.

Bottom layer: imports nothing from `calibration` or `adpdm_export`, and nothing of training.
"""
