"""The training worker: `python -m feedback.train JOB.json`, always in its own process.

SFT (TRL, completion-only loss) on corrections and liked answers, kept close to
the base model by a KL term on its own answers to shipped general prompts
(self-distillation anchors against forgetting), then KTO on binary labels when
there are enough; LoRA continued from the parent adapter or
started from the base model; seeded. The adapter and its evaluation report are
written to a temporary directory that is renamed into place only when complete,
so a crash or kill leaves nothing half-written where the registry looks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from feedback.dataset import Example, read_examples
from feedback.evaluate import answer_logprobs, completion_batches

PRECISIONS = ("auto", "bf16", "fp32")  # TrainJob.precision


@dataclass
class TrainJob:
    model_dir: str
    out_dir: str  # final adapter directory (must not exist yet)
    work_dir: str  # dataset files, logs, TensorBoard events
    parent_path: str | None = None  # continue this adapter; None = a new LoRA on the base model
    # Defaults measured with benchmarks/feedback_loop.py (README, "Measured figures"): the MLP
    # projections hold the new facts; the KL anchors below keep the golden set within its margin.
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
    # and the evaluation stay fp32. On two AVX512-BF16 cores bf16 cut the benchmark's training
    # time by a fifth, token-F1 within the seed-to-seed spread (README, "Measured figures").
    precision: str = "auto"
    lora_dropout: float = 0.0
    # NEFTune (Jain et al. 2023): uniform noise on the input embeddings while training, scaled
    # by alpha / sqrt(tokens x width), on the KL anchor batches too (their base-model targets
    # are clean); None: off. Off by default: alpha 5 looked better on one seed of the
    # benchmark's set and was not over three (README, "Measured figures").
    neftune_alpha: float | None = None
    # Noisy copies of each SFT question (`augment_questions`). With 3 epochs, token-F1 on the
    # benchmark's unseen paraphrases went from 0.628 / 0.598 / 0.571 (none, 6 epochs) to
    # 0.784 / 0.849 / 0.788 over seeds 0 / 1 / 2 (README, "Measured figures").
    augment: int = 2
    augment_drop: float = 0.2
    seed: int = 0
    kto_min_examples: int = 16  # fewer binary labels than this: SFT only
    kto_learning_rate: float = 5e-5
    kto_epochs: float = 1.0
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
    anchor_weight: float = 1.0  # weight of the KL term against the SFT loss
    # Anchors per step (None: the SFT batch size). 4 rather than 8 cut a step from 13.3 to
    # about 10 s on two CPU cores; token-F1 median of three seeds 0.784 (0.788 with 8), the
    # golden-set loss lower on every seed (README, "Measured figures").
    anchor_batch_size: int | None = 4
    anchor_max_tokens: int = 64
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
                     lora_dropout=job.lora_dropout, task_type="CAUSAL_LM")
    return get_peft_model(base, cfg), tokenizer


def _common_args(job: TrainJob, name: str) -> dict[str, Any]:
    return dict(output_dir=str(Path(job.work_dir) / name),
                per_device_train_batch_size=job.batch_size, max_length=job.max_length,
                logging_steps=1, save_strategy="no", report_to=["tensorboard"],
                bf16=trains_in_bf16(job), fp16=False, gradient_checkpointing=False,
                seed=job.seed, data_seed=job.seed, use_cpu=not _cuda(), dataloader_num_workers=0,
                disable_tqdm=False)


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def trains_in_bf16(job: TrainJob) -> bool:
    """Whether to train under bf16 autocast (`TrainJob.precision`)."""
    import torch

    if job.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                         f"not {job.precision!r}")
    if job.precision != "auto":
        return job.precision == "bf16"
    if _cuda():
        return bool(torch.cuda.is_bf16_supported())
    # oneDNN's check for native bf16 instructions (AVX512-BF16, AMX); emulated bf16 is slower
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and native is not None and native())


def train(job: TrainJob) -> dict[str, Any]:
    """Train, evaluate and write the adapter + report atomically; returns the report."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    precision = "bf16" if trains_in_bf16(job) else "fp32"  # an unknown one fails here, early
    set_seed(job.seed)
    work = Path(job.work_dir)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(work / "tensorboard"))
    sft = read_examples(work / "sft.jsonl")
    kto = read_examples(work / "kto.jsonl")
    model, tokenizer = _model(job)
    stats: dict[str, Any] = {"sft_examples": len(sft), "kto_examples": 0,
                             "precision": precision}
    started = time.perf_counter()
    anchors = anchor_examples(model, tokenizer, job) if sft else []
    stats["anchor_examples"] = len(anchors)
    stats["anchor_seconds"] = time.perf_counter() - started
    if sft:
        hard = anchors if job.anchor_loss == "sft" else []
        noisy = augment_questions(sft, job.augment, job.augment_drop, seed=job.seed)
        stats["augmented_examples"] = len(noisy)
        data = Dataset.from_list([_chat(e.prompt, e.completion) for e in sft + noisy + hard])
        common = _common_args(job, "sft")
        if job.padding_free:  # TRL cannot truncate then; the dataset's token budget bounds it
            common["max_length"] = None
        args = SFTConfig(**common, learning_rate=job.learning_rate, num_train_epochs=job.epochs,
                         completion_only_loss=True, padding_free=job.padding_free,
                         neftune_noise_alpha=job.neftune_alpha)
        kl = [] if hard else completion_batches(
            tokenizer, [(e.prompt, e.completion) for e in anchors],
            job.anchor_batch_size or job.batch_size)
        trainer = _anchored(SFTTrainer)(model=model, args=args, train_dataset=data,
                                        processing_class=tokenizer, anchor_batches=kl,
                                        anchor_weight=job.anchor_weight)
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
    examples = (len(sft) + stats.get("augmented_examples", 0)
                + (len(anchors) if job.anchor_loss == "sft" else 0))
    stats["examples_per_s"] = examples * job.epochs / max(stats["train_seconds"], 1e-9)
    report = {"train": stats, **evaluate(model, tokenizer, job)}
    _write_atomically(model, report, Path(job.out_dir))
    return report


def augment_questions(examples: list[Example], copies: int, drop: float, *,
                      seed: int) -> list[Example]:
    """`copies` noisy variants of each example's question (the last message), the answer
    unchanged: each word dropped with probability `drop`, or two words swapped (EDA, Wei and
    Zou 2019), so the adapter keys on a question's content words rather than its wording."""
    rng = random.Random(seed)
    out = []
    for e in examples:
        words = e.prompt[-1]["content"].split()
        if len(words) < 3:
            continue
        for _ in range(copies):
            if rng.random() < 0.5:
                noisy = [w for w in words if rng.random() >= drop] or [rng.choice(words)]
            else:
                noisy = list(words)
                i, j = rng.sample(range(len(noisy)), 2)
                noisy[i], noisy[j] = noisy[j], noisy[i]
            question = {**e.prompt[-1], "content": " ".join(noisy)}
            out.append(Example(e.conversation_id, e.answer_id, [*e.prompt[:-1], question],
                               e.completion, "augment"))
    return out


def _anchored(base: type) -> type:
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
            answers = _greedy_batch(model, tokenizer, [system + [{"role": "user", "content": p}]
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


def _greedy_batch(model: Any, tokenizer: Any, chats: list[list[dict[str, str]]],
                  max_tokens: int, batch: int = 16) -> list[dict[str, Any]]:
    """Greedy answers, left-padded batches; `finished` says whether the model stopped itself."""
    import torch

    out: list[dict[str, Any]] = []
    eos = tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    training = model.training
    model.eval()
    try:
        for i in range(0, len(chats), batch):
            texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                     for c in chats[i:i + batch]]
            enc = tokenizer(texts, return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                     top_p=None, top_k=None, temperature=None,
                                     pad_token_id=eos)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                finished = eos in row
                row = row[:row.index(eos)] if finished else row
                out.append({"text": tokenizer.decode(row, skip_special_tokens=True).strip(),
                            "finished": finished})
    finally:
        tokenizer.padding_side = side
        model.train(training)
    return out


def evaluate(model: Any, tokenizer: Any, job: TrainJob) -> dict[str, Any]:
    """Candidate (the trained adapter) vs parent (the serving adapter, or the base model)."""
    from feedback.evaluate import golden_set, greedy

    model.eval()
    heldout = read_examples(Path(job.work_dir) / "heldout.jsonl")[: job.eval_max_examples]
    system = [{"role": "system", "content": job.system_prompt}] if job.system_prompt else []
    golden = [(system + [{"role": "user", "content": g["question"]}], g["answer"])
              for g in golden_set()]
    known = [e.completion for e in read_examples(Path(job.work_dir) / "sft.jsonl")]

    # Greedy answers stop 16 tokens past the longest reference: room for a right answer, and
    # the base model, which rambles to the limit, spent a third of the evaluation at 96.
    longest = max((len(tokenizer(e.completion)["input_ids"]) for e in heldout), default=0)
    max_tokens = min(job.eval_max_tokens, longest + 16)

    def metrics() -> dict[str, Any]:
        return _metrics(model, tokenizer, heldout, golden, known, max_tokens)

    report: dict[str, Any] = {"heldout_examples": len(heldout), "candidate": metrics()}
    if job.parent_path:
        model.load_adapter(job.parent_path, adapter_name="parent")
        model.set_adapter("parent")
        report["parent"] = metrics()
        model.set_adapter("default")
        model.delete_adapter("parent")
    else:
        with model.disable_adapter():
            report["parent"] = metrics()
    report["parity_prompts"] = job.parity_prompts
    report["parity_outputs"] = [
        greedy(model, tokenizer, system + [{"role": "user", "content": p}], job.parity_max_tokens)
        for p in job.parity_prompts]
    return report


def _metrics(model: Any, tokenizer: Any, heldout: list[Example],
             golden: list[tuple[list[dict[str, str]], str]], known: list[str],
             max_tokens: int) -> dict[str, Any]:
    from feedback.evaluate import answer_scores, mean_loss, pref_accuracy

    pairs = [(e.prompt, e.completion, e.rejected) for e in heldout if e.rejected]
    answers = [a["text"] for a in _greedy_batch(model, tokenizer, [e.prompt for e in heldout],
                                                max_tokens)]
    scores = answer_scores(answers, [e.completion for e in heldout], known)
    return {"heldout_loss": mean_loss(model, tokenizer, [(e.prompt, e.completion)
                                                         for e in heldout]),
            "heldout_f1": scores["f1"], "heldout_accuracy": scores["accuracy"],
            "heldout_wrong": scores["wrong"],
            "heldout_answers": answers[:8],
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
