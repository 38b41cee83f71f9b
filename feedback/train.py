"""The training worker: `python -m feedback.train JOB.json`, always in its own process.

SFT (TRL, completion-only loss) on corrections and liked answers, then KTO on
binary labels when there are enough; LoRA continued from the parent adapter or
started from the base model; seeded. The adapter and its evaluation report are
written to a temporary directory that is renamed into place only when complete,
so a crash or kill leaves nothing half-written where the registry looks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from feedback.dataset import Example, read_examples


@dataclass
class TrainJob:
    model_dir: str
    out_dir: str  # final adapter directory (must not exist yet)
    work_dir: str  # dataset files, logs, TensorBoard events
    parent_path: str | None = None  # continue this adapter; None = a new LoRA on the base model
    rank: int = 8
    alpha: int = 16
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                                 "o_proj"])
    learning_rate: float = 2e-4
    epochs: float = 3.0
    batch_size: int = 8
    max_length: int = 384
    seed: int = 0
    kto_min_examples: int = 16  # fewer binary labels than this: SFT only
    kto_learning_rate: float = 5e-5
    kto_epochs: float = 1.0
    eval_max_examples: int = 64
    system_prompt: str = ""
    parity_prompts: list[str] = field(default_factory=list)
    parity_max_tokens: int = 24

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> TrainJob:
        return cls(**json.loads(path.read_text()))


def _chat(prompt: list[dict[str, str]], completion: str) -> dict[str, Any]:
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": completion}]}


def _model(job: TrainJob) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    base = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=torch.float32)
    if job.parent_path:
        return PeftModel.from_pretrained(base, job.parent_path, is_trainable=True), tokenizer
    cfg = LoraConfig(r=job.rank, lora_alpha=job.alpha, target_modules=job.target_modules,
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(base, cfg), tokenizer


def _common_args(job: TrainJob, name: str) -> dict[str, Any]:
    return dict(output_dir=str(Path(job.work_dir) / name),
                per_device_train_batch_size=job.batch_size, max_length=job.max_length,
                logging_steps=1, save_strategy="no",
                report_to=["tensorboard"], bf16=False, fp16=False, gradient_checkpointing=False,
                seed=job.seed, data_seed=job.seed, use_cpu=not _cuda(), dataloader_num_workers=0,
                disable_tqdm=False)


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def train(job: TrainJob) -> dict[str, Any]:
    """Train, evaluate and write the adapter + report atomically; returns the report."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    set_seed(job.seed)
    work = Path(job.work_dir)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(work / "tensorboard"))
    sft = read_examples(work / "sft.jsonl")
    kto = read_examples(work / "kto.jsonl")
    model, tokenizer = _model(job)
    stats: dict[str, Any] = {"sft_examples": len(sft), "kto_examples": 0}
    started = time.perf_counter()
    if sft:
        data = Dataset.from_list([_chat(e.prompt, e.completion) for e in sft])
        args = SFTConfig(**_common_args(job, "sft"), learning_rate=job.learning_rate,
                         num_train_epochs=job.epochs, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                             processing_class=tokenizer)
        stats["sft_loss"] = trainer.train().training_loss
        stats["sft_tokens"] = int(sum(len(x) for x in trainer.train_dataset["input_ids"])
                                  * job.epochs)
    if len(kto) >= job.kto_min_examples:
        data = Dataset.from_list([{**_chat(e.prompt, e.completion), "label": bool(e.label)}
                                  for e in kto])
        args = KTOConfig(**_common_args(job, "kto"), learning_rate=job.kto_learning_rate,
                         num_train_epochs=job.kto_epochs)
        trainer = KTOTrainer(model=model, args=args, train_dataset=data,
                             processing_class=tokenizer)
        stats["kto_loss"] = trainer.train().training_loss
        stats["kto_examples"] = len(kto)
        if "ref" in model.peft_config:  # KTO's reference copy of the adapter
            model.delete_adapter("ref")
    stats["train_seconds"] = time.perf_counter() - started
    stats["tokens_per_s"] = stats.get("sft_tokens", 0) / max(stats["train_seconds"], 1e-9)
    stats["examples_per_s"] = len(sft) * job.epochs / max(stats["train_seconds"], 1e-9)
    report = {"train": stats, **evaluate(model, tokenizer, job)}
    _write_atomically(model, report, Path(job.out_dir))
    return report


def evaluate(model: Any, tokenizer: Any, job: TrainJob) -> dict[str, Any]:
    """Candidate (the trained adapter) vs parent (the serving adapter, or the base model)."""
    from feedback.evaluate import golden_set, greedy

    model.eval()
    heldout = read_examples(Path(job.work_dir) / "heldout.jsonl")[: job.eval_max_examples]
    system = [{"role": "system", "content": job.system_prompt}] if job.system_prompt else []
    golden = [(system + [{"role": "user", "content": g["question"]}], g["answer"])
              for g in golden_set()]
    report: dict[str, Any] = {"heldout_examples": len(heldout),
                              "candidate": _metrics(model, tokenizer, heldout, golden)}
    if job.parent_path:
        model.load_adapter(job.parent_path, adapter_name="parent")
        model.set_adapter("parent")
        report["parent"] = _metrics(model, tokenizer, heldout, golden)
        model.set_adapter("default")
        model.delete_adapter("parent")
    else:
        with model.disable_adapter():
            report["parent"] = _metrics(model, tokenizer, heldout, golden)
    report["parity_prompts"] = job.parity_prompts
    report["parity_outputs"] = [
        greedy(model, tokenizer, system + [{"role": "user", "content": p}], job.parity_max_tokens)
        for p in job.parity_prompts]
    return report


def _metrics(model: Any, tokenizer: Any, heldout: list[Example],
             golden: list[tuple[list[dict[str, str]], str]]) -> dict[str, Any]:
    from feedback.evaluate import mean_loss, pref_accuracy

    pairs = [(e.prompt, e.completion, e.rejected) for e in heldout if e.rejected]
    return {"heldout_loss": mean_loss(model, tokenizer, [(e.prompt, e.completion)
                                                         for e in heldout]),
            "golden_loss": mean_loss(model, tokenizer, golden),
            "pref_accuracy": pref_accuracy(model, tokenizer, pairs)}


def _write_atomically(model: Any, report: dict[str, Any], out: Path) -> None:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, selected_adapters=["default"])
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, out)  # atomic: the adapter appears whole or not at all


def main(argv: list[str]) -> int:
    job = TrainJob.load(Path(argv[1]))
    report = train(job)
    print(json.dumps({"done": job.out_dir, "train": report["train"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
