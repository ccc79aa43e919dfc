"""Model loading from every source we can reach offline, and LoRA adapters that round-trip."""

from __future__ import annotations

import pytest
import torch

from booster.errors import UserError
from booster.models import (
    LoraSettings,
    ModelConfig,
    add_lora,
    load_adapter,
    load_model_and_tokenizer,
    load_trained,
    save_model,
)


def test_tiny_is_deterministic_and_pads_with_a_non_eos_token():
    m1, tok = load_model_and_tokenizer(ModelConfig(name="tiny"), seed=3)
    m2, _ = load_model_and_tokenizer(ModelConfig(name="tiny"), seed=3)
    m3, _ = load_model_and_tokenizer(ModelConfig(name="tiny"), seed=4)
    w1, w2, w3 = (m.get_input_embeddings().weight for m in (m1, m2, m3))
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert m1.config.num_hidden_layers == 2


def test_lora_defaults_are_the_papers():
    lora = LoraSettings()
    assert (lora.r, lora.alpha, lora.dropout) == (32, 4, 0.0)
    assert lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert ModelConfig().trust_remote_code is False


def test_adapter_saves_as_safetensors_reloads_and_trains_further(tmp_path):
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny"))
    model = add_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    save_model(model, tok, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_model.safetensors" in files and not any(f.endswith(".bin") for f in files)

    base, _ = load_model_and_tokenizer(ModelConfig(name="tiny"))
    reloaded = load_adapter(base, tmp_path / "adapter", trainable=True)
    ids = torch.tensor([tok("hello there")["input_ids"]])
    model.eval()
    reloaded.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)

    trainable = [p for p in reloaded.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in reloaded.named_parameters() if p.requires_grad)
    before = [p.detach().clone() for p in trainable]
    reloaded.train()
    loss = reloaded(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(trainable, lr=0.1).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable, strict=True))


def test_local_folder_and_full_recipe(tmp_path):
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny"))
    save_model(model, tok, tmp_path / "full")
    assert (tmp_path / "full" / "model.safetensors").exists()
    again, tok2 = load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "full")))
    assert torch.equal(model.get_input_embeddings().weight, again.get_input_embeddings().weight)
    assert tok2.pad_token_id == tok.pad_token_id
    via_recipe, _ = load_trained(ModelConfig(name="tiny"), {"full": "full"}, root=tmp_path)
    assert torch.equal(model.get_input_embeddings().weight, via_recipe.get_input_embeddings().weight)


def test_double_lora_recipe_merges_first_adapter(tmp_path):
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny"))
    model = add_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    save_model(model, tok, tmp_path / "first")
    merged, _ = load_trained(ModelConfig(name="tiny"), {"merge": ["first"]}, root=tmp_path)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([tok("a test")["input_ids"]])
    model.eval()
    torch.testing.assert_close(
        model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    "name,needle",
    [("./no/such/folder", "no such file or folder"), ("/tmp/none.gguf", "no such GGUF file")],
)
def test_bad_model_names_are_user_errors(name, needle):
    with pytest.raises(UserError, match=needle):
        load_model_and_tokenizer(ModelConfig(name=name))


def test_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_model_and_tokenizer(ModelConfig(name=str(tmp_path)))


@pytest.mark.slow
def test_embedded_model_loads_and_caches(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("BOOSTER_CACHE", str(tmp_path))
    model, tok = load_model_and_tokenizer(ModelConfig(name="embedded"))
    assert model.config.num_hidden_layers == 30 and len(tok) >= 49152
    start = time.time()
    load_model_and_tokenizer(ModelConfig(name="embedded"))
    assert time.time() - start < 10  # from the safetensors cache, not the GGUF
    assert list(tmp_path.glob("gguf/*/model.safetensors"))


def test_a_dropped_model_frees_its_memory_without_a_garbage_collection(monkeypatch):
    """What lets free_device_memory skip gc.collect on the CPU: a model with a LoRA adapter, after a
    training step and a generation through booster's decoding, is freed by its last reference."""
    import gc
    import weakref

    from peft import LoraConfig, get_peft_model

    from booster.evaluation.generation import generate_ids
    from booster.models import ModelConfig, free_device_memory, load_model_and_tokenizer

    collected = []
    monkeypatch.setattr(gc, "collect", lambda *a, **k: collected.append(a) or 0)
    gc.disable()
    try:
        model, tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny", dtype="float32"))
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        ids = tokenizer(["a b c d"], return_tensors="pt")["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        generate_ids(model, tokenizer, ["a b", "c d e f g"], max_new_tokens=4, progress=False)
        weights = [weakref.ref(p) for p in model.parameters()]
        del model
        free_device_memory()
        assert all(w() is None for w in weights)  # gone with the reference, no collection needed
        assert collected == []  # the CPU path does not collect
    finally:
        gc.enable()
