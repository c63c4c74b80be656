"""Triton Python-backend model `generate`, written by `adpdm export-triton` (do not edit the copy).

The sampling loop of `adpdm serve`'s `generate` model (engines.sampler.sample with the build's
scheduler config), where each step's noise prediction is a BLS call to the group model
`unet_g{k}` chosen by the timestep value (adpdm_generate.json: `timestep_to_group`).
All items of one step share a timestep, so each step is one call to one group model.

An SDXL-layout build also takes `text_embeds` (1 or n, P) and `time_ids` (1 or n, 6; the build's
default size when missing), checked as `adpdm serve` checks them
(engines.conditioning.request_added_conditions).

A text build (adpdm_generate.json: `text_pipeline`) also takes `prompt[, negative_prompt,
guidance_scale]`: the tokenizer(s), text encoder(s) and VAE copied into this version folder run here
(engines.text_pipeline, the same code as `adpdm serve` and `adpdm sample --prompt`), the guided
loop sends 2n items per step, and `images` are the VAE's pixels; `notes` says when a prompt was
truncated to the tokenizer's limit.

Needs in the container's Python: numpy, torch (CPU is enough), diffusers, this project's
`engines` package (pip install --no-deps adpdm-export) and, for a text build, transformers;
see docs/serving.md.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

MAX_SEED = 2**63 - 1


class _BadRequest(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(here, "adpdm_generate.json")) as f:
            self.meta = json.load(f)
        self.table = np.asarray(self.meta["timestep_to_group"], dtype=np.int64)
        self.models = self.meta["group_models"]
        self.shape = tuple(self.meta["sample_shape"])
        self.limits = self.meta["limits"]
        self.max_batch = int(self.meta["max_batch"])
        self.cond_names = list(self.meta["conditioning"])
        self.t_dtype = np.int32 if self.meta.get("timestep_dtype") == "TYPE_INT32" else np.int64
        self.text = None
        if self.meta.get("text_pipeline"):
            from engines.text_pipeline import load_text_pipeline

            self.text = load_text_pipeline(os.path.join(here, self.meta["text_pipeline"]["folder"]),
                                           self.meta["conditioning"])

    # ------------------------------------------------------------------ helpers
    def _scalar(self, request, name, lo, hi, default=None):
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is None:
            if default is None:
                raise _BadRequest(f"missing input {name!r}")
            return default
        v = t.as_numpy()
        if v.size != 1:
            raise _BadRequest(f"{name} must hold exactly one value, got shape {tuple(v.shape)}")
        x = int(v.reshape(-1)[0])
        if not lo <= x <= hi:
            raise _BadRequest(f"{name} must be in [{lo}, {hi}], got {x}")
        return x

    def _predict_chunk(self, x, t, cond):
        k = int(self.table[int(t[0])])
        inputs = [pb_utils.Tensor("sample", np.ascontiguousarray(x, dtype=np.float32)),
                  pb_utils.Tensor("timestep", np.ascontiguousarray(t.reshape(-1, 1), dtype=self.t_dtype))]
        for name, v in cond.items():
            v = np.ascontiguousarray(v)
            inputs.append(pb_utils.Tensor(name, v.reshape(-1, 1) if name == "class_labels" else v))
        resp = pb_utils.InferenceRequest(
            model_name=self.models[k], requested_output_names=["out_sample"], inputs=inputs
        ).exec()
        if resp.has_error():
            raise RuntimeError(f"{self.models[k]}: {resp.error().message()}")
        return pb_utils.get_output_tensor_by_name(resp, "out_sample").as_numpy()

    def _predictor(self):
        import torch

        def predict(sample, timestep, **cond):
            x = sample.numpy()
            t = timestep.numpy().astype(np.int64)
            c = {k: v.numpy() for k, v in cond.items()}
            outs = []
            for s in range(0, x.shape[0], self.max_batch):  # engines take at most max_batch items
                e = slice(s, s + self.max_batch)
                outs.append(self._predict_chunk(x[e], t[e], {k: v[e] for k, v in c.items()}))
            return torch.from_numpy(np.concatenate(outs))

        return predict

    def _prompt(self, request):
        from engines.errors import AdpdmError
        from engines.text_pipeline import prompt_request

        raw = {}
        for name in ("prompt", "negative_prompt", "guidance_scale"):
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is not None:
                raw[name] = t.as_numpy()
        try:
            prompt = prompt_request(raw)
        except AdpdmError as e:
            raise _BadRequest(str(e)) from None
        if prompt is not None and self.text is None:
            raise _BadRequest("prompt given, but this repository's generate model has no text encoder "
                              "(export-triton found no text pipeline for the build)")
        return prompt

    def _one(self, request):
        import torch

        from engines.conditioning import ADDED_COND_INPUTS, request_added_conditions
        from engines.errors import AdpdmError
        from engines.sampler import initial_noise, sample
        from engines.scheduling import SCHEDULERS, make_scheduler
        from engines.text_pipeline import TEXT_INPUT, guided_conditions

        seed = self._scalar(request, "seed", 0, MAX_SEED)
        n = self._scalar(request, "n", 1, int(self.limits["max_n"]))
        steps = self._scalar(request, "steps", 1, int(self.limits["max_steps"]))
        prompt = self._prompt(request)
        name = "ddim"
        st = pb_utils.get_input_tensor_by_name(request, "scheduler")
        if st is not None:
            v = st.as_numpy().reshape(-1)
            name = v[0].decode("utf-8", "replace") if isinstance(v[0], bytes) else str(v[0])
            if name not in SCHEDULERS:
                raise _BadRequest(f"unknown scheduler {name[:40]!r}: choose one of {', '.join(SCHEDULERS)}")
        added = {}
        for cname in ADDED_COND_INPUTS:
            ct = pb_utils.get_input_tensor_by_name(request, cname)
            added[cname] = None if ct is None else ct.as_numpy()
        try:  # SDXL: text_embeds (or the prompt's), time_ids (or the spec's default): adpdm serve's rule
            cond = request_added_conditions(self.meta["conditioning"], added, n, prompt is not None)
        except AdpdmError as e:
            raise _BadRequest(str(e)) from None
        for cname in self.cond_names:
            if cname in ADDED_COND_INPUTS:
                continue
            ct = pb_utils.get_input_tensor_by_name(request, cname)
            if cname == TEXT_INPUT and prompt is not None:
                if ct is not None:
                    raise _BadRequest(f"give prompt or {TEXT_INPUT}, not both")
                continue
            if ct is None:
                raise _BadRequest(f"missing input {cname!r}: this model needs {', '.join(self.cond_names)}"
                                  + (" (or a prompt)" if self.text is not None else ""))
            v = ct.as_numpy()
            if cname == "class_labels":
                v = v.reshape(-1).astype(np.int64)
                if v.size not in (1, n):
                    raise _BadRequest(f"class_labels has {v.size} values for n={n}")
                num = self.meta["conditioning"][cname].get("num_classes")
                if num is not None and ((v < 0) | (v >= num)).any():
                    raise _BadRequest(f"class_labels must be in [0, {num})")
                v = np.repeat(v, n) if v.size == 1 else v
            else:
                if v.ndim == 2:
                    v = v[None]
                if v.ndim != 3 or v.shape[0] not in (1, n) or not np.isfinite(v).all():
                    raise _BadRequest("encoder_hidden_states must be finite, (1 or n, sequence, dim)")
                v = np.repeat(v, n, axis=0) if v.shape[0] == 1 else v
            cond[cname] = torch.from_numpy(np.ascontiguousarray(v))
        uncond, scale, notes = None, 1.0, []
        if prompt is not None:
            g = guided_conditions(self.text.text_encoder, prompt, n, cond)
            cond, uncond, scale, notes = g.cond, g.uncond, g.guidance_scale, g.notes
        sched = make_scheduler(self.meta["scheduler"], name)
        noise = initial_noise(n, self.shape, seed)
        images = sample(self._predictor(), sched, noise, steps, cond=cond, seed=seed, guidance_scale=scale,
                        uncond=uncond).images
        outputs = []
        if self.text is not None:
            images = self.text.decode(images)
            outputs.append(pb_utils.Tensor("notes", np.array(["; ".join(notes).encode()], dtype=np.object_)))
        outputs.insert(0, pb_utils.Tensor("images", images.numpy().astype(np.float32)))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def execute(self, requests):
        responses = []
        for request in requests:  # one error response per bad request, the others still run
            try:
                responses.append(self._one(request))
            except _BadRequest as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
            except Exception as e:  # a group model failed, or a bug: report it, keep serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}")))
        return responses
