"""The training job: what the loop asks the training process to do (`job.json`).

`TrainJob` is the contract between `feedback.loop`, which writes it into the run's
directory, and the worker (`python -m feedback.train JOB.json`); `trains_in_bf16` resolves
its precision choice (`PRECISIONS`) for the hardware at hand.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inference.batching import PRECISIONS, native_bf16  # TrainJob.precision: serving's rule


@dataclass
class TrainJob:
    model_dir: str
    out_dir: str  # final adapter directory (must not exist yet)
    work_dir: str  # dataset files, logs, TensorBoard events
    parent_path: str | None = None  # continue this adapter; None = a new LoRA on the base model
    # The defaults are the ones benchmarks/feedback_loop.py measures (docs/benchmarks.md): the
    # MLP projections hold the new facts; the KL anchors below keep the golden set in its margin.
    rank: int = 16
    alpha: int = 32
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    learning_rate: float = 2e-3
    epochs: float = 3.0
    batch_size: int = 8
    max_length: int = 384
    padding_free: bool = False  # SFT batches as one unpadded sequence (block-diagonal attention)
    # "auto": the SFT and KTO steps (the KL term included) under bf16 autocast where the
    # hardware computes bf16 natively (a CUDA GPU that supports it, a CPU with AVX512-BF16 or
    # AMX), fp32 elsewhere; "bf16" or "fp32" to force one. The adapter's weights, the optimizer
    # and the evaluation stay fp32. bf16 trains about a fifth faster where it is native, with
    # token-F1 within the seed-to-seed spread.
    precision: str = "auto"
    lora_dropout: float = 0.0
    # NEFTune (Jain et al. 2023): uniform noise on the input embeddings while training, scaled
    # by alpha / sqrt(tokens x width), on the KL anchor batches too (their base-model targets
    # are clean); None: off. Off by default: it did not help over the benchmark's three seeds.
    neftune_alpha: float | None = None
    # Noisy copies of each SFT question (`augment_questions`): they teach the answer to
    # phrasings the reviewer never wrote (token-F1 on the benchmark's unseen paraphrases).
    augment: int = 2
    augment_drop: float = 0.2
    # Each correction once more with the answer memory's quotes for its question in the prompt
    # (`reference_copies`: RAFT), so the adapter uses the approved answers the turn path
    # quotes instead of writing over them; needs `memory_embedder`.
    reference_copies: bool = True
    seed: int = 0
    # The gate's policy (feedback.evaluate.GatePolicy's fields) when, once the candidate
    # passes it, the recipe is to be trained again on every correction, the held-out ones
    # too ("settling", feedback.train._settle); None: they wait for the next run with new
    # held-out data.
    settle_gate: dict[str, Any] | None = None
    kto_min_examples: int = 16  # fewer binary labels than this: SFT only
    kto_learning_rate: float = 5e-5
    kto_epochs: float = 1.0
    dpo_min_pairs: int = 8  # fewer hand-off preference pairs than this: no DPO step
    dpo_learning_rate: float = 5e-5
    dpo_epochs: float = 2.0
    dpo_beta: float = 0.1
    # DPO alone lowers the chosen answers' likelihood along with the rejected ones' (RPO,
    # Pang et al. 2024): the agent's answer's NLL, with this weight, keeps it up
    dpo_sft_weight: float = 1.0
    eval_max_examples: int = 64
    eval_max_tokens: int = 96  # greedy answers to held-out questions (answer F1 and accuracy)
    system_prompt: str = ""
    # Self-distillation anchors against forgetting: the base model's own greedy answers to
    # shipped general prompts (feedback/data/general_prompts.jsonl, not the golden set),
    # generated once per base model + system prompt and cached beside the run directories.
    # Each SFT step adds the KL divergence of the trained model from the base model on one
    # batch of them ("kl"), or they are mixed in as ordinary SFT examples ("sft").
    anchors: int = 48  # how many general prompts to use (0: none)
    anchor_loss: str = "kl"
    # Weight of the KL term against the SFT loss. 1.5 since the quoted copies
    # (`reference_copies`): their extra steps raised the golden-set loss by 5.4 % at 1.0 (the
    # gate's margin is 5 %); 4.1 % at 1.5 and 2.9 % at 2.0 on one dataset, +1.1 % at 1.5 in
    # the benchmark's run, which learned more at 1.5 (docs/benchmarks.md#answer-memory).
    anchor_weight: float = 1.5
    # Anchors per step (None: the SFT batch size). 4 keeps a step about a quarter shorter than
    # 8 on two CPU cores at the same token-F1 and golden-set loss.
    anchor_batch_size: int | None = 4
    anchor_max_tokens: int = 64
    parity_prompts: list[str] = field(default_factory=list)
    parity_max_tokens: int = 24
    # the answer memory the gate measures with (the gateway's CHATLOOP_MEMORY_EMBEDDER; "": no
    # memory figures) and its thresholds (None: the embedder's calibrated ones)
    memory_embedder: str = "minilm"
    memory_answer_at: float | None = None
    memory_refer_at: float | None = None

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> TrainJob:
        return cls(**json.loads(path.read_text()))


def cuda() -> bool:
    """Whether the training process has a CUDA GPU."""
    import torch

    return bool(torch.cuda.is_available())


def trains_in_bf16(job: TrainJob) -> bool:
    """Whether to train under bf16 autocast (`TrainJob.precision`)."""

    if job.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                         f"not {job.precision!r}")
    # "auto": native bf16 only (a CUDA GPU that has it, AVX512-BF16 or AMX); emulated is slower
    return job.precision == "bf16" or (job.precision == "auto" and native_bf16())

