"""The training phases' kernels (feedback.train.training_kernels) on the bundled model: the
frozen weights held in bf16 and the adapters' inputs left in bf16 give the step autocast
would give, TRL's fused head gives the same log-probabilities scoring the labelled positions
only, LoRA layers scaled on the rank side answer as peft's, and everything is put back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from feedback.train import training_kernels

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def model(model_dir: Path):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=MODULES, task_type="CAUSAL_LM",
                     init_lora_weights=False)  # B is not zero: the adapter changes the output
    return get_peft_model(base, cfg)


def _step(model, tokenizer) -> tuple[float, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    enc = tokenizer(["How long do I have to return something?", "Do you ship to Ireland?"],
                    return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**enc, labels=labels).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.requires_grad}


def test_frozen_weights_in_bf16_give_the_step_autocast_gives(model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model.get_base_model().set_attn_implementation("eager")
    loss, grads = _step(model, tokenizer)  # autocast's own casts, peft's too
    with training_kernels(model, bf16=True):
        lm_head = model.get_base_model().lm_head.weight
        assert lm_head.dtype == torch.bfloat16
        assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"] \
            .weight.dtype == torch.float32  # what trains stays fp32
        loss_bf16, grads_bf16 = _step(model, tokenizer)
    assert loss_bf16 == loss
    assert grads_bf16.keys() == grads.keys() and len(grads) == 2 * len(MODULES) * 30
    assert all(torch.equal(grads_bf16[n], grads[n]) for n in grads)


def test_lora_scaled_on_the_rank_side_answers_like_peft(model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model.eval()  # per-row adapter_names are for inference
    model.get_base_model().set_attn_implementation("eager")  # as training_kernels on the CPU
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    enc = tokenizer(["Where is my parcel?"], return_tensors="pt")
    with torch.no_grad():
        alone = model(**enc).logits
        with model.disable_adapter():
            base = model(**enc).logits
        with training_kernels(model, bf16=False):
            assert "forward" in vars(layer)  # the rank-side scaling is in place
            assert torch.allclose(model(**enc).logits, alone, atol=1e-4)
            with model.disable_adapter():  # peft's forward answers what it does not
                assert torch.equal(model(**enc).logits, base)
            per_row = model(**enc, adapter_names=["__base__"]).logits
    assert "forward" not in vars(layer)  # peft's again
    assert not torch.allclose(base, alone, atol=1e-2)  # the adapter does change the output
    assert torch.equal(per_row, base)


def test_everything_is_put_back(model) -> None:  # type: ignore[no-untyped-def]
    causal_lm = model.get_base_model()
    before = {n: p for n, p in model.named_parameters()}
    attention = causal_lm.config._attn_implementation
    with pytest.raises(RuntimeError, match="mid-way"), training_kernels(model, bf16=True):
        assert causal_lm.config._attn_implementation == "eager"
        raise RuntimeError("a phase failed mid-way")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(p.dtype == torch.float32 for p in after.values())
    assert causal_lm.lm_head.weight is causal_lm.model.embed_tokens.weight  # tied again
    assert causal_lm.config._attn_implementation == attention


def test_the_fused_head_scores_the_labelled_positions_alike(model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy"))
    enc = tokenizer(["Where is my parcel?", "Can I pay with a gift card online?"],
                    return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    labels[:, :3] = -100  # a prompt
    with torch.no_grad():
        every = model(**enc, labels=labels, fused_lm_head=True)
        with training_kernels(model, bf16=False):
            model.get_base_model().set_attn_implementation("sdpa")  # the head alone differs
            compact = model(**enc, labels=labels, fused_lm_head=True)
    assert every.log_probs.shape == compact.log_probs.shape
    assert torch.allclose(every.log_probs, compact.log_probs, atol=1e-5)
    assert torch.allclose(every.entropy, compact.entropy, atol=1e-5)
