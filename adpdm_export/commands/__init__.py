"""One module per `adpdm` sub-command; each exposes `register(app)`.

Modules import their heavy dependencies (torch, onnxruntime) inside the command
body so `adpdm --help` stays fast.
"""

COMMAND_MODULES = [
    "adpdm_export.commands.export_cmd",
    "adpdm_export.commands.sample_cmd",
    "adpdm_export.commands.doctor_cmd",
    "adpdm_export.commands.calibrate_cmd",
    "adpdm_export.commands.eval_cmd",
    "adpdm_export.commands.lint_cmd",
    "adpdm_export.commands.inspect_cmd",
    "adpdm_export.commands.serve_cmd",
    "adpdm_export.commands.generate_cmd",
    "adpdm_export.commands.export_triton_cmd",
    "adpdm_export.commands.build_engine_cmd",
]
