"""The training worker: `python -m feedback.train JOB.json`, always in its own process.

SFT (TRL, completion-only loss) on corrections and liked answers (each correction
also with the answer memory's quotes for its question in the prompt), kept close to
the base model by a KL term on its own answers to shipped general prompts
(self-distillation anchors against forgetting), then KTO on binary labels when
there are enough, then DPO on the hand-offs' preference pairs when there are
`dpo_min_pairs`; LoRA continued from the parent adapter or started from the base
model; seeded. Once the candidate's evaluation passes the gate (`job.settle_gate`), the
same recipe is trained again from the same start on every correction, the held-out ones
too, and that adapter ships (`_settle`). The adapter and its evaluation
report are written to a temporary directory that is renamed into place only when
complete, so a crash or kill leaves nothing half-written where the registry looks.

The job it reads is `feedback.job.TrainJob`; the anchors and their trainer are in
`feedback.anchors`, the candidate's evaluation report in `feedback.candidate`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from feedback.anchors import anchor_examples, anchored
from feedback.candidate import (
    evaluate,
    golden_items,
    parity_outputs,
    run_memory,
    whole_memory,
)
from feedback.evaluate import completion_batches
from feedback.examples import augment_questions, read_examples, reference_copies
from feedback.job import TrainJob, cuda, trains_in_bf16

__all__ = ["augment_questions", "train"]


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


@contextmanager
def training_kernels(model: Any, bf16: bool) -> Iterator[None]:
    """The training phases' fastest way to compute the same model and losses (measured
    in docs/benchmarks.md#training-throughput):

    - eager attention on the CPU: on sequences of a few hundred tokens it is faster than
      SDPA, whose flash kernel's backward took an eighth of a step; the same attention,
      summed in another order;
    - with bf16 autocast, the frozen weights held in bf16: autocast caches the bf16 copies of
      trained weights only, so every frozen linear layer was cast again on every forward
      pass. The cast is the same rounding once, so the products are the same; for the same
      reason peft does not cast each adapter's input up to fp32 for autocast to cast it back;
    - TRL's fused LM head scores only the positions that have a label, as it does on GPUs.
      On other devices it scores every position (static shapes for compilers such as
      Neuron's), on the CPU the prompt and the padding too, with its entropy and top-1
      statistics, in SFT and in each of KTO's four forward passes a step. The
      log-probabilities are the same;
    - a plain LoRA layer scales its adapter's rank-wide product instead of the layer's whole
      output (`_lora_scaled_low`): the scaling passes over the adapted layers' outputs were
      7 % of an SFT step's operator time. Bitwise peft's step at the default alpha
      (`tests/feedback/test_training_kernels.py`). One `addmm` for the sum as well was
      measured and not kept: oneDNN's bf16 sum rounds differently.

    All of it is undone after (SDPA, the fp32 weights, peft's casts and forward, TRL's own
    choice): evaluation, parity and the saved adapter see the model as loaded."""
    import torch
    import trl.trainer.utils as trl_utils
    from peft.helpers import disable_input_dtype_casting
    from peft.tuners.lora import Linear as LoraLinear

    causal_lm = model.get_base_model()
    attention = causal_lm.config._attn_implementation
    frozen = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and "lora_" not in name  # adapters (KTO's frozen reference copy too) stay fp32
              and not m.weight.requires_grad and m.weight.dtype == torch.float32] if bf16 else []
    weights = [m.weight for m in frozen]
    scores_compact = trl_utils._use_triton  # TRL's test for "score the labelled positions only"
    plain = [m for m in model.modules() if type(m) is LoraLinear and not m.lora_variant
             and all(isinstance(d, torch.nn.Identity) for d in m.lora_dropout.values())]
    if next(model.parameters()).device.type == "cpu":
        causal_lm.set_attn_implementation("eager")
    try:
        for m, w in zip(frozen, weights, strict=True):
            m.weight = torch.nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
        for m in plain:
            m.forward = types.MethodType(_lora_scaled_low, m)
        trl_utils._use_triton = lambda device: device.type == "cpu" or scores_compact(device)
        with disable_input_dtype_casting(model, active=bf16):
            yield
    finally:
        trl_utils._use_triton = scores_compact
        for m in plain:
            del m.forward  # peft's own again
        for m, w in zip(frozen, weights, strict=True):
            m.weight = w  # the tied LM head gets its embedding's parameter back
        causal_lm.set_attn_implementation(attention)


def _lora_scaled_low(layer: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """A plain LoRA layer's forward, base(x) + B(A(x) * scaling): peft's sum with the scaling
    on the rank-wide side instead of the layer's whole output. Bitwise peft's when the scaling
    is a power of two (the default alpha 2r); anything else peft's forward handles (per-row
    `adapter_names`, disabled or merged adapters) goes to peft's."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x)
    for name in layer.active_adapters:
        if name in layer.lora_A:
            result = result + layer.lora_B[name](layer.lora_A[name](x) * layer.scaling[name])
    return result


def counted(base: type) -> type:
    """The trainer, counting the tokens that go through a forward and a backward pass:
    its training batches' real tokens (SFT's and KTO's sequences; with padding-free SFT, no
    mask: every token), and what a subclass adds to `trained_tokens` (the KL anchors)."""

    class Counted(base):  # type: ignore[misc,valid-type]
        trained_tokens = 0

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if model.training:
                mask = inputs.get("attention_mask")
                self.trained_tokens += int(mask.sum() if mask is not None
                                           else inputs["input_ids"].numel())
            return super().compute_loss(model, inputs, *args, **kwargs)

    return Counted


def _common_args(job: TrainJob, name: str) -> dict[str, Any]:
    return dict(output_dir=str(Path(job.work_dir) / name),
                per_device_train_batch_size=job.batch_size, max_length=job.max_length,
                logging_steps=1, save_strategy="no", report_to=["tensorboard"],
                bf16=trains_in_bf16(job), fp16=False, gradient_checkpointing=False,
                seed=job.seed, data_seed=job.seed, use_cpu=not cuda(), dataloader_num_workers=0,
                disable_tqdm=False)


def train(job: TrainJob) -> dict[str, Any]:
    """Train, evaluate and write the adapter + report atomically; returns the report."""
    from transformers import set_seed

    bf16 = trains_in_bf16(job)  # an unknown precision fails here, early
    set_seed(job.seed)
    work = Path(job.work_dir)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(work / "tensorboard"))
    sft = read_examples(work / "sft.jsonl")
    model, tokenizer = _model(job)
    memory = run_memory(job, copies=bool(sft) and job.reference_copies)
    started = time.perf_counter()
    anchors = anchor_examples(model, tokenizer, job) if sft else []
    anchor_seconds = time.perf_counter() - started
    stats = _fit(model, tokenizer, job, sft, anchors, memory, bf16, "sft")
    stats.update(anchor_examples=len(anchors), anchor_seconds=anchor_seconds)
    stats["train_seconds"] = time.perf_counter() - started
    # honest: every token a forward and backward pass went through (SFT, KL anchors, KTO),
    # over the whole run's training time (anchors' preparation included; DPO's time too)
    stats["tokens_per_s"] = stats["trained_tokens"] / max(stats["train_seconds"], 1e-9)
    examples = (len(sft) + stats.get("augmented_examples", 0)
                + (len(anchors) if job.anchor_loss == "sft" else 0))
    stats["examples_per_s"] = examples * job.epochs / max(stats["train_seconds"], 1e-9)
    report = {"train": stats, **evaluate(model, tokenizer, job, memory)}
    if job.settle_gate is not None:  # every correction, once the gate is passed
        model, report["settle"] = _settle(model, tokenizer, job, report, anchors, memory, bf16)
    _write_atomically(model, report, Path(job.out_dir))
    return report


def _fit(model: Any, tokenizer: Any, job: TrainJob, sft: list[Any], anchors: list[Any],
         memory: tuple[Any, float, float] | None, bf16: bool, name: str) -> dict[str, Any]:
    """The recipe's phases on `model`: SFT on `sft` (named `name` in the figures and the
    TensorBoard directory), KTO on the run's labels, DPO on its preference pairs, each when
    there is enough of it; their figures (`trained_tokens`: SFT's with its anchors, KTO's)."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    work = Path(job.work_dir)
    kto = read_examples(work / "kto.jsonl")
    stats: dict[str, Any] = {f"{name}_examples": len(sft), "kto_examples": 0,
                             "precision": "bf16" if bf16 else "fp32"}
    started = time.perf_counter()
    if sft:
        stats.update(_sft(model, tokenizer, job, sft, anchors, memory, bf16, name))
        stats[f"{name}_seconds"] = time.perf_counter() - started
    if len(kto) >= job.kto_min_examples:
        kto_started = time.perf_counter()
        data = Dataset.from_list([{**_chat(e.prompt, e.completion), "label": bool(e.label)}
                                  for e in kto])
        args = KTOConfig(**_common_args(job, f"{name}-kto" if name != "sft" else "kto"),
                         learning_rate=job.kto_learning_rate, num_train_epochs=job.kto_epochs)
        trainer = counted(KTOTrainer)(model=model, args=args, train_dataset=data,
                                      processing_class=tokenizer)
        with training_kernels(model, bf16):
            stats["kto_loss"] = trainer.train().training_loss
        stats["kto_examples"] = len(kto)
        stats["kto_tokens"] = trainer.trained_tokens
        stats["kto_seconds"] = time.perf_counter() - kto_started
        if "ref" in model.peft_config:  # KTO's reference copy of the adapter
            model.delete_adapter("ref")
    dpo = read_examples(work / "dpo.jsonl")
    if len(dpo) >= job.dpo_min_pairs:
        stats.update(_dpo(model, tokenizer, job, dpo))
    stats["trained_tokens"] = stats.get(f"{name}_tokens", 0) + stats.get("kto_tokens", 0)
    return stats


def _sft(model: Any, tokenizer: Any, job: TrainJob, sft: list[Any], anchors: list[Any],
         memory: tuple[Any, float, float] | None, bf16: bool, name: str) -> dict[str, Any]:
    """One SFT phase on `sft` (plus its noisy copies, the memory's quoted copies and, with
    `anchor_loss` "sft", the anchors as examples; else the KL term on them): its figures."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    hard = anchors if job.anchor_loss == "sft" else []
    noisy = augment_questions(sft, job.augment, job.augment_drop, seed=job.seed)
    copies = _referenced(job, sft, tokenizer, memory)
    noisy += copies
    data = Dataset.from_list([_chat(e.prompt, e.completion) for e in sft + noisy + hard])
    common = _common_args(job, name)
    if job.padding_free:  # TRL cannot truncate then; the dataset's token budget bounds it
        common["max_length"] = None
    args = SFTConfig(**common, learning_rate=job.learning_rate,
                     num_train_epochs=job.epochs,
                     completion_only_loss=True, padding_free=job.padding_free,
                     neftune_noise_alpha=job.neftune_alpha)
    kl = [] if hard else completion_batches(
        tokenizer, [(e.prompt, e.completion) for e in anchors],
        job.anchor_batch_size or job.batch_size)
    trainer = anchored(counted(SFTTrainer))(
        model=model, args=args, train_dataset=data, processing_class=tokenizer,
        anchor_batches=kl, anchor_weight=job.anchor_weight)
    with training_kernels(model, bf16):
        loss = trainer.train().training_loss
    return {f"{name}_loss": loss, f"{name}_tokens": trainer.trained_tokens,  # anchors' included
            "referenced_examples": len(copies), "augmented_examples": len(noisy)}


def _settle(gated: Any, tokenizer: Any, job: TrainJob, report: dict[str, Any],
            anchors: list[Any], memory: tuple[Any, float, float] | None, bf16: bool
            ) -> tuple[Any, dict[str, Any]]:
    """Once the candidate passes the gate (`job.settle_gate`), the recipe the gate judged is
    trained again from the same start (the parent adapter, or a new LoRA) on every
    correction: the trained ones and the held-out ones together, the same seed, anchors,
    labels and pairs. The gate measured how the recipe does on corrections it did not see;
    the adapter that ships has learned them all instead of leaving a fifth of a team's
    corrections for a later run. The gate's held-out figures stay the ones it judged on; the
    golden-set loss is measured again and must stay within the gate's margin of the serving
    model's, else the gated candidate ships. Returns the model to save and what happened;
    updates `report` (golden-set loss, parity outputs) when the refit ships."""
    from transformers import set_seed

    from feedback.evaluate import GatePolicy, gate, mean_loss

    work = Path(job.work_dir)
    policy = GatePolicy(**(job.settle_gate or {}))
    heldout = settleable(work)
    out: dict[str, Any] = {"examples": 0, "kept": False}
    if not heldout:
        return gated, {**out, "why": "no held-out corrections to train on"}
    if reasons := gate(report, policy):
        return gated, {**out, "why": "the gate rejected the candidate: " + "; ".join(reasons)}
    started = time.perf_counter()
    set_seed(job.seed)
    model, _ = _model(job)
    sft = read_examples(work / "sft.jsonl") + [replace(e, source="correction") for e in heldout]
    # the quotes from the whole memory: nothing is held out now, and the turn path quotes the
    # held-out questions' entries to the adapter that ships
    whole = whole_memory(job, memory) if job.reference_copies else None
    out.update(_fit(model, tokenizer, job, sft, anchors, whole, bf16, "settle"))
    model.eval()
    golden = mean_loss(model, tokenizer, golden_items(job))
    limit = report["parent"]["golden_loss"] * (1 + policy.golden_margin)
    out.update(examples=len(heldout), golden_loss=golden,
               heldout_loss=mean_loss(model, tokenizer, [(e.prompt, e.completion)
                                                         for e in heldout]),
               answer_ids=[e.answer_id for e in heldout],
               seconds=time.perf_counter() - started)
    if golden is not None and golden > limit:
        return gated, {**out, "why": f"golden-set loss {golden:.4f} above {limit:.4f}: the "
                                     "gated candidate ships"}
    out["kept"] = True
    report["candidate"]["gated_golden_loss"] = report["candidate"]["golden_loss"]
    report["candidate"]["golden_loss"] = golden
    report["parity_outputs"] = parity_outputs(model, tokenizer, job)
    return model, out


def settleable(work: Path) -> list[Any]:
    """The run's held-out corrections settling trains on: real ones (not the gate's
    rephrasings), none whose target holds a placeholder."""
    from feedback.redaction import has_placeholder

    return [e for e in read_examples(work / "heldout.jsonl")
            if e.source in ("correction", "handoff") and not has_placeholder(e.completion)]


def _referenced(job: TrainJob, sft: list[Any], tokenizer: Any,
                memory: tuple[Any, float, float] | None) -> list[Any]:
    """The corrections with the memory's quotes for their questions (`reference_copies`):
    `memory` is the run's without the held-out questions (candidate.run_memory), as the
    gate searches it (settling's: all of it); each correction's own entry (the same
    question) is left out. The entries the turn path would quote (from the reference
    threshold, the best three), as many as fit in `max_length` tokens (training truncates
    what is longer, the answer first)."""
    if not job.reference_copies or memory is None:
        return []
    index, _, refer_at = memory

    def refs(question: str) -> list[tuple[str, str]]:
        hits = [h for h in index.search(question, k=8) if h.score >= refer_at]
        docs = [index.docs[h.id] for h in hits if h.id in index.docs]
        return [(d.question, d.answer) for d in docs if d.question != question][:3]

    def fits(e: Any) -> bool:
        text = tokenizer.apply_chat_template(
            [*e.prompt, {"role": "assistant", "content": e.completion}], tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= job.max_length

    return reference_copies(sft, refs, fits)


def _dpo(model: Any, tokenizer: Any, job: TrainJob, pairs: list[Any]) -> dict[str, Any]:
    """DPO on the hand-offs' preference pairs (chosen: the agent's reply, rejected: the bot's
    answer), continuing the same LoRA adapter after SFT; the reference is a frozen copy of
    the adapter as SFT left it (TRL's "ref" adapter). With `dpo_sft_weight`, the chosen
    answer's NLL is added to the sigmoid loss (TRL's "sft" loss type)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"prompt": e.prompt,
                               "chosen": [{"role": "assistant", "content": e.completion}],
                               "rejected": [{"role": "assistant", "content": e.rejected or ""}]}
                              for e in pairs])
    losses = {"sigmoid": 1.0, "sft": job.dpo_sft_weight} if job.dpo_sft_weight else {"sigmoid": 1.0}
    args = DPOConfig(**_common_args(job, "dpo"), learning_rate=job.dpo_learning_rate,
                     num_train_epochs=job.dpo_epochs, beta=job.dpo_beta,
                     loss_type=list(losses), loss_weights=list(losses.values()))
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    with training_kernels(model, trains_in_bf16(job)):
        loss = trainer.train().training_loss
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    model.set_adapter("default")
    return {"dpo_loss": loss, "dpo_pairs": len(pairs)}


def _write_atomically(model: Any, report: dict[str, Any], out: Path) -> None:
    """Write the adapter beside `out` and rename it into place: it appears whole or not at
    all. Every file and the directory are fsynced before the rename (and the parent after
    it); a failed write (disk full: ENOSPC, EFBIG) removes the partial copy and raises."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, selected_adapters=["default"])
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        for path in sorted(tmp.rglob("*"), key=lambda p: -len(p.parts)):  # files, then dirs
            _fsync(path, os.O_RDONLY)
        _fsync(tmp, os.O_RDONLY)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out.parent, os.O_RDONLY)  # the rename itself


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keep_freed_memory() -> bool:
    """glibc only: keep freed memory in the process instead of handing it back to the system
    (heap trimming) or serving tensors from fresh mappings. A training step allocates and
    frees thousands of activations of a few megabytes; by default each was a new mapping
    whose pages fault in again on first touch (the elementwise passes over a layer's output
    took up to twice as long). The worker's peak is what it keeps; it is its own process and
    exits when the run ends. False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # not POSIX, or not glibc
        return False
    if not libc_version.startswith("glibc"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    trim_threshold, top_pad, mmap_threshold = -1, -2, -3  # mallopt's M_* parameters
    return bool(libc.mallopt(mmap_threshold, 32 << 20)  # glibc's largest: 32 MiB
                and libc.mallopt(trim_threshold, 1 << 30) and libc.mallopt(top_pad, 64 << 20))


def main(argv: list[str]) -> int:
    keep_freed_memory()
    job = TrainJob.load(Path(argv[1]))
    report = train(job)
    print(json.dumps({"done": job.out_dir, "train": report["train"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
