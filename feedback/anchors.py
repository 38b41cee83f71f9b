"""Against forgetting: self-distillation anchors, and the SFT trainer that uses them.

The base model's own greedy answers to shipped general prompts
(feedback/data/general_prompts.jsonl, not the golden set), generated once per base model
and system prompt and cached beside the run directories; each SFT step adds the KL
divergence of the trained model from the base model on one batch of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from importlib import resources
from pathlib import Path
from typing import Any

from feedback.candidate import greedy_batch
from feedback.evaluate import answer_logprobs
from feedback.examples import Example
from feedback.job import TrainJob


def anchored(base: type) -> type:
    """SFTTrainer plus KL(base model || trained model) on anchor answers, one batch a step."""
    import torch

    class AnchoredSFTTrainer(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, anchor_batches: list[dict[str, Any]],
                     anchor_weight: float, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._anchor_batches, self._anchor_weight, self._anchor_step = (
                anchor_batches, anchor_weight, 0)
            peft_model = self.accelerator.unwrap_model(self.model)
            device = next(peft_model.parameters()).device
            with torch.no_grad(), peft_model.disable_adapter():
                for batch in anchor_batches:  # the base model's distribution, computed once
                    for key in ("input_ids", "attention_mask", "mask"):
                        batch[key] = batch[key].to(device)
                    batch["ref"] = answer_logprobs(peft_model, batch).half()

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if not self._anchor_batches or not model.training:
                return out
            batch = self._anchor_batches[self._anchor_step % len(self._anchor_batches)]
            self._anchor_step += 1
            self.trained_tokens = getattr(self, "trained_tokens", 0) + int(
                batch["attention_mask"].sum())
            ref = batch["ref"].float()
            with self.accelerator.autocast():  # the SFT forward's precision (bf16 or fp32)
                cur = answer_logprobs(self.accelerator.unwrap_model(model), batch)
            kl = (ref.exp() * (ref - cur)).sum(-1).mean()
            self._metrics["train"]["anchor_kl"].append(float(kl.detach()))
            if return_outputs:
                return out[0] + self._anchor_weight * kl, out[1]
            return out + self._anchor_weight * kl

    return AnchoredSFTTrainer


def general_prompts() -> list[str]:
    text = (resources.files("feedback.data").joinpath("general_prompts.jsonl")
            .read_text(encoding="utf-8"))
    return [json.loads(line)["question"] for line in text.splitlines() if line.strip()]


def anchor_examples(model: Any, tokenizer: Any, job: TrainJob) -> list[Example]:
    """The base model's greedy answers to up to `job.anchors` general prompts (cached)."""
    if job.anchors <= 0:
        return []
    system = [{"role": "system", "content": job.system_prompt}] if job.system_prompt else []
    prompts = general_prompts()
    prompts = random.Random(job.seed).sample(prompts, min(job.anchors, len(prompts)))
    key = hashlib.sha256(json.dumps([_model_fingerprint(job.model_dir), system, prompts,
                                     job.anchor_max_tokens]).encode()).hexdigest()[:16]
    cache = Path(job.work_dir).parent / ".anchors" / f"{key}.jsonl"
    if cache.exists():
        answers = [json.loads(line) for line in cache.read_text().splitlines()]
    else:
        with model.disable_adapter():
            # one batch: on two CPU cores 48 prompts took 39 s at once, 65 s in threes of 16
            answers = greedy_batch(model, tokenizer, [system + [{"role": "user", "content": p}]
                                                      for p in prompts], job.anchor_max_tokens,
                                   batch=len(prompts))
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(a) + "\n" for a in answers))
        os.rename(tmp, cache)
    return [Example(0, 0, system + [{"role": "user", "content": p}], a["text"], "anchor")
            for p, a in zip(prompts, answers, strict=True)
            if a["finished"] and a["text"].strip()]  # a cut-off answer would teach rambling


def _model_fingerprint(model_dir: str) -> str:
    files = sorted(Path(model_dir).glob("*.safetensors")) + [Path(model_dir) / "config.json"]
    return json.dumps([(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files
                       if f.exists()])

