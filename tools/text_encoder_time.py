"""The text encoder of a text-to-image build in PyTorch (what `adpdm sample` and `adpdm serve` run) against
its own ONNX graph in onnxruntime: seconds per guided request (the prompt and the negative prompt, batch
2, the tokenizer's full length), the two outputs' largest difference, and the same request's share of a
sampling loop. Written to docs/text_encoder_time.json; docs/runtime.md reads it.

    .venv/bin/python tools/text_encoder_time.py --threads 2

Encoders: the bundled `reference-text` pipeline's, and SD-1.5's CLIP ViT-L/14 text encoder config
(123M parameters, random weights: timing does not need trained weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_JSON = ROOT / "docs" / "text_encoder_time.json"
# SD-1.5's text_encoder/config.json (openai/clip-vit-large-patch14's text tower)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def encoders():
    from transformers import CLIPTextConfig, CLIPTextModel

    from adpdm_export.model_loading import bundled_folder, load_model
    from adpdm_export.text_prompts import default_prompts
    from engines.text_pipeline import load_text_encoder

    folder = bundled_folder("reference-text")
    ref = load_text_encoder(folder, load_model("reference-text").conditioning)
    prompt = default_prompts(folder)[0]
    ids = ref.tokens([prompt, ""])[0]
    yield "reference-text", ref.model.eval(), ids
    import torch

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    yield "clip-vit-l (SD-1.5 config, random)", clip, torch.randint(0, CLIP_L["vocab_size"], (2, 77))


def median_s(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)

    class LastHiddenState(torch.nn.Module):
        """The encoder's last hidden state (what StableDiffusionPipeline conditions on) as a plain output."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).last_hidden_state

    rows = []
    for name, model, ids in encoders():
        with torch.no_grad():
            ref = model(input_ids=ids).last_hidden_state.numpy()
            torch_s = median_s(lambda: model(input_ids=ids), args.reps)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = Path(tmp) / "text_encoder.onnx"
            with torch.no_grad():
                torch.onnx.export(LastHiddenState(model), (ids,), str(path), input_names=["input_ids"],
                                  output_names=["hidden"], dynamic_axes={"input_ids": {0: "batch"}}, opset_version=19,
                                  dynamo=False)
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = args.threads, 1, 3
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            feed = {"input_ids": ids.numpy().astype(np.int64)}
            got = sess.run(None, feed)[0]
            ort_s = median_s(lambda: sess.run(None, feed), args.reps)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append({"encoder": name, "params_m": round(params, 2), "tokens": int(ids.shape[1]), "batch": int(ids.shape[0]),
                     "pytorch_ms": round(torch_s * 1e3, 2), "onnxruntime_ms": round(ort_s * 1e3, 2),
                     "pytorch_over_onnxruntime": round(torch_s / ort_s, 2),
                     "max_abs_diff": float(np.abs(got - ref).max())})
        print(f"{name}: PyTorch {torch_s * 1e3:.2f} ms, onnxruntime {ort_s * 1e3:.2f} ms (batch 2, {ids.shape[1]} tokens)",
              flush=True)
    out = {"threads": args.threads, "reps": args.reps, "rows": rows,
           "command": "python tools/text_encoder_time.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
