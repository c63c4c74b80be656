"""Speed benchmark (issue 8): our CPU-target group graphs through the runner vs the tools a
user would pick instead, on the DDPM-CIFAR10 UNet layout and the bundled reference model.

    .venv/bin/python -m tools.bench_speed                 # full: docs/bench_speed.json + docs/benchmarks.md
    .venv/bin/python -m tools.bench_speed --calib-time    # ... plus the full ADP-DM calibration time (long)
    .venv/bin/python -m tools.bench_speed --quick         # < 3 min on 2 cores; runs/bench-speed-quick.json
    .venv/bin/python -m tools.bench_speed --quick --out-json TMP/s.json --no-docs   # what a test runs

(from the repository root). --quick: the reference model only, batches 1 and 4, a few calls; RSS
at batch 4 on the reference model; calibration timing on a tiny UNet; build-engine with tiny
ADP-DM settings. It never touches docs/: it writes the JSON and its "## Speed" section (<json>.md
+ PNG) beside the JSON.

Parts (each can be skipped; a skipped part keeps the section of the previous JSON, with its command),
one module each:

* latency (latency.py): batch 1 and 16, `--threads` (2) threads in torch and onnxruntime (intra-op,
  inter-op 1), all variants of one model in ONE process, interleaved round-robin (the start rotates
  every round), warm-up excluded; every raw time is kept. Variants (set up in models.py): PyTorch
  eager FP32, onnxruntime FP32 (the FP ONNX graph), onnxruntime `quantize_static` QDQ (the
  ort_static peer's fastest graph), ModelOpt's exported QDQ graph on onnxruntime (modelopt_int8
  peer), ours (the CPU-target group graphs through `TimestepDispatchRunner`), plus diagnostic rows
  (our group graph in a plain session at onnxruntime's defaults; the runner with pre-packing off).
  Random weights are fine for speed: the kernels' cost does not depend on the values.
  Scales do not matter either, so every quantizer is calibrated on a small budget.
* dispatch (dispatch.py): the runner vs a bare `session.run` of the same group session on the same
  inputs (interleaved), and the runner's own cost alone (its session replaced by one returning a
  precomputed output), as ms and % of a step.
* rss (rss.py): resident memory of the runner with G = 1 and G = 4 over real builds of the 35.7M
  UNet, at batch 1 and 16, each in a fresh interpreter (`--rss-child`): as shipped, with
  onnxruntime's weight pre-packing off, and (experiment) pre-packing off plus the INT8 weights
  shared from the one memory map, to show where the per-group memory goes; the one-session
  experiment (one_session.py) is one more configuration.
* calibration (`--calib-time`, calib_time.py): full ADP-DM calibration (the CLI defaults: G = 4,
  64 samples x 100 DDIM steps) of the 35.7M-parameter UNet with random weights (a trained model is
  not needed for timing); quick mode: a tiny UNet with tiny settings.
* build (build_stages.py): `build_engine` wall time per stage for the reference model (fresh out
  folder and trajectory cache, nothing reused).

cli.py has the options and runs the parts; targets.py judges the targets; report.py renders the
"## Speed" section of docs/benchmarks.md (tools/bench_report.py calls `report.render_markdown`).
"""
