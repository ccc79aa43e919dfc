"""``align.compile`` / ``attack.compile``: the decoder layers train compiled, take Booster's update as
eager layers do, and are put back afterwards; methods that act on the layers' outputs refuse it."""

from __future__ import annotations

import pytest
import torch

from booster.cli import main
from booster.compilation import compiled_layers, decoder_layers
from booster.config import load_config
from booster.errors import UserError
from booster.stages.align import align_dir
from tests.test_booster_step import make_model
from tests.test_precision import _trainer, _update
from tests.test_user_errors import set_error


def test_compiled_layers_take_boosters_update_and_are_put_back(tiny_tokenizer, tmp_path):
    from torch._dynamo.utils import counters

    eager = _update(_trainer(make_model(tiny_tokenizer, True, torch.float32), tiny_tokenizer, tmp_path / "a"))
    model = make_model(tiny_tokenizer, True, torch.float32)
    trainer = _trainer(model, tiny_tokenizer, tmp_path / "b")
    layers = decoder_layers(model)
    model.config.use_cache = True  # as a loaded checkpoint has it
    assert len(layers) == 2
    torch._dynamo.reset()
    counters.clear()
    with compiled_layers(model, True):
        assert all("forward" in layer.__dict__ for layer in layers)
        assert not model.config.use_cache  # no per-layer cache state: one graph serves every layer
        compiled = _update(trainer)
    # the layers ran compiled: graphs were captured, and no more than one per gradient mode of the
    # layer's input (the first layer's input needs no gradient) and per kind of pass
    assert 1 <= counters["stats"]["unique_graphs"] <= 4
    for got, want in zip(compiled, eager, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert all("forward" not in layer.__dict__ for layer in layers)  # the class's forward again
    assert model.config.use_cache


def test_compile_off_leaves_the_model_alone(tiny_tokenizer):
    model = make_model(tiny_tokenizer, True, torch.float32)
    model.config.use_cache = True
    with compiled_layers(model, False):
        assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))
        assert model.config.use_cache


def test_a_model_without_decoder_layers_is_a_user_error():
    with pytest.raises(UserError, match="set align.compile and attack.compile to false"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("method", ["vaccine", "repnoise", "booster+vaccine", "vaccine+mix"])
def test_methods_acting_on_layer_outputs_refuse_compile(capsys, tmp_path, method):
    line = set_error(capsys, tmp_path, "align.compile=true", f"methods=[{method}]")
    assert "align.compile: " in line and "set align.compile: false" in line


def test_compile_is_fingerprinted_apart_and_named_in_the_passthrough(capsys, tmp_path):
    eager = load_config("configs/tiny.yaml")
    compiled = load_config("configs/tiny.yaml", ["align.compile=true"])
    assert align_dir(eager, "sft", 0) != align_dir(compiled, "sft", 0)
    assert align_dir(eager, "sft", 0) == align_dir(
        load_config("configs/tiny.yaml", ["align.compile=false"]), "sft", 0
    )
    line = set_error(capsys, tmp_path, "attack.trainer={torch_compile: true}")
    assert "attack.trainer.torch_compile: booster sets it from attack.compile" in line


def test_a_compiled_run_trains_and_reports(tmp_path):
    out = tmp_path / "out"
    argv = ["run", "--config", "configs/tiny.yaml", "--output-dir", str(out), "--quiet"]
    # Lisa: SFT's alignment and Lisa's fine-tuning, both compiled (Booster's step: the test above)
    argv += ["--set", "align.compile=true", "--set", "attack.compile=true", "--set", "methods=[lisa]"]
    assert main(argv) == 0
    assert (out / "results.json").is_file()
    assert len(list((out / "attack").glob("lisa-*/done.json"))) == 1
