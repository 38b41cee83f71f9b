"""Make a real peft LoRA adapter for a model directory, with random (non-zero) B weights."""

from __future__ import annotations

from pathlib import Path


def make_lora_adapter(model_dir: Path, out: Path, *, rank: int, seed: int,
                      std: float = 0.3) -> Path:
    """`std` 0.3 changes greedy text strongly (some prompts then end at once); 0.03 keeps the
    base model's fluency."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=["q_proj", "v_proj"],
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter): make it change outputs
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)  # 0.3: strong enough to change greedy text
    target = out / f"lora-r{rank}-s{seed}"
    peft_model.save_pretrained(target)
    return target
