"""The CUDA path (skipped without a GPU; benchmarks/gpu_check.sh runs it on one).

The same Booster step on CUDA and on CPU gives the same update in float32; in bf16 the weights come
back bit-exactly after the simulated step and all three passes run under autocast.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_booster_step import make_model, trainable
from tests.test_precision import _trainer, _update

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_booster_step_on_cuda_equals_cpu(tiny_tokenizer, tmp_path):
    cpu = _update(
        _trainer(make_model(tiny_tokenizer, True, dtype=torch.float32), tiny_tokenizer, tmp_path / "cpu")
    )
    trainer = _trainer(
        make_model(tiny_tokenizer, True, dtype=torch.float32), tiny_tokenizer, tmp_path / "gpu", use_cpu=False
    )
    assert trainer.args.device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 arithmetic, not TF32
    gpu = _update(trainer)
    for got, want in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-5)


def test_bf16_booster_step_on_cuda(tiny_tokenizer, tmp_path):
    model = make_model(tiny_tokenizer, True, dtype=torch.bfloat16)
    trainer = _trainer(model, tiny_tokenizer, tmp_path, use_cpu=False, gradient_accumulation_steps=1)
    params = trainable(trainer.model)
    before = [p.detach().clone() for p in params]
    terms = trainer.booster_terms(trainer.model, num_micro_batches=2)
    assert all(p.device.type == "cuda" for p in params)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)  # restored from the saved copy, not by adding back
    assert terms.harmful_loss_reduction != 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_bf16_autocast_on_cuda(tiny_tokenizer, tmp_path):
    model = make_model(tiny_tokenizer, True, dtype=torch.float32)
    trainer = _trainer(model, tiny_tokenizer, tmp_path, bf16=True, use_cpu=False)
    seen: list[torch.dtype] = []
    q_proj = trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    q_proj.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    update = _update(trainer)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(torch.isfinite(u).all() for u in update)
