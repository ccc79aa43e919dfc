"""Precision and memory options keep Booster's update: checkpointing, bf16 autocast, bf16 weights."""

from __future__ import annotations

import pytest
import torch

from booster.methods.booster import BoosterConfig, BoosterTrainer
from tests.helpers import HARMFUL, REFUSALS, tokenized
from tests.test_booster_step import full_precision_rmsnorm, make_model, trainable  # noqa: F401


def _trainer(model, tokenizer, tmp_path, **overrides) -> BoosterTrainer:
    kwargs = dict(
        output_dir=str(tmp_path),
        optim="sgd",
        learning_rate=1.0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        max_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        lamb=5.0,
        alpha=0.5,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    align, harm = tokenized(REFUSALS, tokenizer), tokenized(HARMFUL, tokenizer)
    return BoosterTrainer(
        model=model,
        args=BoosterConfig(**kwargs),
        train_dataset=align,
        harmful_dataset=harm,
        processing_class=tokenizer,
    )


def _update(trainer: BoosterTrainer) -> list[torch.Tensor]:
    params = trainable(trainer.model)
    before = [p.detach().clone() for p in params]
    trainer.train()
    return [p.detach() - b for p, b in zip(params, before, strict=True)]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_gradient_checkpointing_gives_the_same_update(tiny_tokenizer, tmp_path, monkeypatch, lora):
    """Non-reentrant checkpointing recomputes activations inside torch.autograd.grad exactly."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = []
    forward = LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, x: calls.append(1) or forward(self, x))
    plain = _update(_trainer(make_model(tiny_tokenizer, lora), tiny_tokenizer, tmp_path / "a"))
    forwards = len(calls)
    assert forwards == 2 * (2 + 2 + 2)  # 2 layers x (2 harmful passes + alignment) x 2 micro-batches
    checkpointed = _update(
        _trainer(
            make_model(tiny_tokenizer, lora),
            tiny_tokenizer,
            tmp_path / "b",
            activation_checkpointing=True,
            activation_checkpointing_kwargs={"use_reentrant": False},
        )
    )
    assert len(calls) == 3 * forwards  # every backward ran the layers again
    for got, want in zip(checkpointed, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_bf16_weights_are_restored_bit_exactly_by_the_trainer(tiny_tokenizer, tmp_path):
    """The simulated step is undone from a saved copy: bfloat16 weights come back bit for bit."""
    model = make_model(tiny_tokenizer, lora=True, dtype=torch.bfloat16)
    trainer = _trainer(model, tiny_tokenizer, tmp_path, gradient_accumulation_steps=1)
    params = trainable(trainer.model)
    before = [p.detach().clone() for p in params]
    terms = trainer.booster_terms(trainer.model, num_micro_batches=2)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)
    assert terms.harmful_loss_reduction != 0
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in params)
    assert sum(float(p.grad.float().abs().sum()) for p in params) > 0


def test_bf16_autocast_covers_all_three_passes(tiny_tokenizer, tmp_path):
    """bf16=True autocasts the harmful passes and the alignment pass (float32 weights, bf16 matmuls)."""
    model = make_model(tiny_tokenizer, lora=True, dtype=torch.float32)
    trainer = _trainer(model, tiny_tokenizer, tmp_path, bf16=True)
    seen: list[torch.dtype] = []
    q_proj = trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    q_proj.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    update = _update(trainer)
    assert seen == [torch.bfloat16] * (2 * 2 + 2)  # 2 harmful passes x 2 micro-batches, 2 alignment
    assert all(p.dtype == torch.float32 for p in trainable(trainer.model))
    assert all(torch.isfinite(u).all() for u in update)


def test_only_the_frozen_linear_weights_of_an_adapter_model_are_stored_in_bf16(tiny_tokenizer):
    """The weights autocast rounds anyway: base linear layers, never the adapter, embedding, head, norms."""
    from booster.precision import autocast_rounded_weights, frozen_weights_in_bf16

    model = make_model(tiny_tokenizer, lora=True, dtype=torch.float32)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = sorted(names[id(p)] for p in autocast_rounded_weights(model))
    layer = "base_model.model.model.layers.0."
    assert layer + "self_attn.q_proj.base_layer.weight" in chosen
    assert layer + "self_attn.o_proj.weight" in chosen and layer + "mlp.down_proj.weight" in chosen
    assert len(chosen) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with frozen_weights_in_bf16(model, enabled=True) as count:
        assert count == len(chosen)
        for name, p in model.named_parameters():
            assert p.dtype == (torch.bfloat16 if name in chosen else torch.float32), name
    for name, p in model.named_parameters():
        want = before[name].to(torch.bfloat16).float() if name in chosen else before[name]
        assert p.dtype == torch.float32 and torch.equal(p.detach(), want), name
    with frozen_weights_in_bf16(model, enabled=False) as count:
        assert count == 0
    full = make_model(tiny_tokenizer, lora=False, dtype=torch.float32)
    assert autocast_rounded_weights(full) == []


@pytest.mark.parametrize("method", ["booster", "sft"])
def test_bf16_weights_train_the_same_adapter_bit_for_bit(tmp_path, monkeypatch, method):
    """A bf16 stage with its frozen weights stored in bfloat16 trains the adapter autocast alone trains."""
    import contextlib

    import booster.stages.common as common
    from booster.config import load_config
    from booster.stages.align import run_align

    stored = common.frozen_weights_in_bf16
    counts: list[int] = []

    @contextlib.contextmanager
    def spy(model, enabled):
        with stored(model, enabled) as count:
            counts.append(count)
            yield count

    def adapter(out: str) -> dict[str, str]:
        config = load_config(
            "configs/tiny.yaml", [f"output_dir={out}", f"methods=[{method}]", "align.bf16=true"]
        )
        info = run_align(config, method, 0, progress=False).info
        return {name: r["sha256"] for name, r in info["files"].items() if "safetensors" in name}

    monkeypatch.setattr(common, "frozen_weights_in_bf16", spy)
    stored_bf16 = adapter(str(tmp_path / "bf16-weights"))
    monkeypatch.setattr(common, "frozen_weights_in_bf16", lambda model, enabled: contextlib.nullcontext(0))
    autocast_only = adapter(str(tmp_path / "autocast"))
    assert counts and counts[0] > 0
    assert stored_bf16 and stored_bf16 == autocast_only
