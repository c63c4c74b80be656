"""Prompt fidelity: does a text-conditional digits model draw the digit its prompt asks for?

The CLIP-score analogue of the bundled text-conditional reference model (`reference-text`):
each sample is judged by the bundled digits classifier against the digit named in its prompt
("a handwritten seven", "the digit 7", "zero"). Reported per sample, as the other metrics
(`metrics.per_sample_summary`), so one bad seed is visible and never averaged away:

* prompt_fidelity: the fraction of samples the classifier reads as the asked digit;
* prompt_prob_median / _p10 / _min (+ _min_seed): the classifier's probability of the asked
  digit per sample: its median and its low tail;
* prompt_fidelity_per_digit: the fraction per asked digit (None for digits never asked).

Comparing a quantized model with its FP model from the same noise adds `compare_fidelity`:
the fraction of samples whose predicted digit is the FP sample's (agreement) and the change in
fidelity. PyTorch only; the classifier is handed in (adpdm_export.reference loads it).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import torch

from engines.errors import AdpdmError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_WORD = {w: i for i, w in enumerate(DIGIT_WORDS)}
_TOKEN = re.compile(r"[a-z]+|[0-9]+")


def digit_of_prompt(prompt: str) -> int:
    """The one digit a prompt names (a word zero..nine or a numeral 0..9); AdpdmError when it names
    none or several different ones, since fidelity to such a prompt is undefined."""
    found = set()
    for tok in _TOKEN.findall(str(prompt).lower()):
        if tok in _WORD:
            found.add(_WORD[tok])
        elif tok.isdigit():
            if len(tok) != 1:
                raise AdpdmError(f"prompt {prompt!r} names the number {tok}; prompt fidelity needs one digit 0..9")
            found.add(int(tok))
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise AdpdmError(f"prompt {prompt!r} names {what}; prompt fidelity needs exactly one (e.g. 'a handwritten seven')")
    return found.pop()


def digits_of_prompts(prompts: Sequence[str]) -> list[int]:
    return [digit_of_prompt(p) for p in prompts]


@torch.no_grad()
def classify(classifier: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
             batch_size: int = 256) -> torch.Tensor:
    """(N, classes) softmax probabilities of images (N, C, H, W) in [-1, 1] (clamped first)."""
    images = images.float().clamp(-1, 1)
    parts = [classifier(images[i:i + batch_size]).float().softmax(1) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, 10)


def fidelity_from_probs(probs: torch.Tensor, labels: Sequence[int],
                        seeds: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """The fidelity keys (module doc) from the classifier's probabilities and the asked digits."""
    labels_t = torch.as_tensor(list(labels), dtype=torch.int64)
    if probs.ndim != 2 or probs.shape[0] != labels_t.numel():
        raise AdpdmError(f"prompt fidelity: {tuple(probs.shape)} probabilities for {labels_t.numel()} asked digits")
    if probs.shape[0] == 0:
        raise AdpdmError("prompt fidelity of no samples")
    if int(labels_t.min()) < 0 or int(labels_t.max()) >= probs.shape[1]:
        raise AdpdmError(f"asked digits must lie in 0..{probs.shape[1] - 1}")
    correct = (probs.argmax(1) == labels_t).double()
    p = probs.double().gather(1, labels_t.view(-1, 1)).flatten()
    worst = int(p.argmin())
    per_digit = []
    for d in range(probs.shape[1]):
        m = labels_t == d
        per_digit.append(float(correct[m].mean()) if bool(m.any()) else None)
    out = {
        "prompt_fidelity": float(correct.mean()),
        "prompt_prob_median": float(p.median()),
        "prompt_prob_p10": float(torch.quantile(p, 0.1)),
        "prompt_prob_min": float(p[worst]),
        "prompt_fidelity_per_digit": per_digit,
        "prompt_fidelity_samples": int(labels_t.numel()),
    }
    if seeds is not None:
        out["prompt_prob_min_seed"] = int(list(seeds)[worst])
    return out


def prompt_fidelity(classifier: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: Sequence[int],
                    seeds: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Fidelity of `images` (N, C, H, W) in [-1, 1] to the asked digits `labels` (N,)."""
    return fidelity_from_probs(classify(classifier, images), labels, seeds)


def compare_fidelity(classifier: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, fp_images: torch.Tensor,
                     labels: Sequence[int], seeds: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Fidelity of quantized `images` and of the FP images from the same noise: the quantized keys,
    the FP ones suffixed `_fp`, prompt_fidelity_delta (quantized - FP) and prompt_agreement (the
    fraction of samples whose predicted digit equals the FP sample's)."""
    pq, pf = classify(classifier, images), classify(classifier, fp_images)
    q = fidelity_from_probs(pq, labels, seeds)
    f = fidelity_from_probs(pf, labels, seeds)
    out = dict(q)
    out.update({f"{k}_fp": v for k, v in f.items() if k != "prompt_fidelity_samples"})
    out["prompt_fidelity_delta"] = q["prompt_fidelity"] - f["prompt_fidelity"]
    out["prompt_agreement"] = float((pq.argmax(1) == pf.argmax(1)).double().mean())
    return out
