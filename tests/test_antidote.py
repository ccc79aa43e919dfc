"""Antidote's repair: the zeroed weights are exactly the top fraction, per output row, of the Wanda
score |W_ij| * ||X_j||_2 over the re-alignment set, computed here independently of the hooks."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from booster.errors import UserError
from booster.methods.antidote import antidote_masks, pruned_per_row
from booster.models import LoraSettings, add_lora, build_tiny_model
from booster.pruning import MASK_FILE, apply_masks, mask_bytes, read_masks
from booster.training import default_collator
from tests.helpers import HARMFUL, tokenized


def _batches(tokenizer):
    rows = tokenized(HARMFUL, tokenizer, max_length=512)
    collate = default_collator(tokenizer)
    return [collate(rows[:3]), collate(rows[3:])]  # two batches, the first one padded


def _layer_inputs(model, layers, batches) -> dict[int, torch.Tensor]:
    """Each layer's attention input over the batches' non-padding tokens, (tokens, hidden) in float64,
    read from the model's hidden states: the input RMSNorm of the hidden state entering the layer."""
    inputs: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for batch in batches:
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
            )
            keep = batch["attention_mask"].bool()
            for i, layer in enumerate(layers):
                inputs.setdefault(i, []).append(layer.input_layernorm(out.hidden_states[i])[keep].double())
    return {i: torch.cat(xs) for i, xs in inputs.items()}


def _top_per_row(weight: torch.Tensor, norm: torch.Tensor, ratio: float) -> torch.Tensor:
    """True at the round(ratio x columns) largest |W_ij| * norm_j of each row, by a plain sort."""
    score = weight.detach().double().abs() * norm[None, :]
    k = math.floor(ratio * weight.shape[1] + 0.5)
    mask = torch.zeros_like(score, dtype=torch.bool)
    for row in range(weight.shape[0]):
        order = sorted(range(weight.shape[1]), key=lambda j: -score[row, j].item())
        mask[row, order[:k]] = True
    return mask


def _independent_masks(model, batches, ratio):
    """The top ``ratio`` of |W| * ||X|| per row of every q_proj / v_proj, X the layer's input."""
    inputs = _layer_inputs(model, model.model.layers, batches)
    expected = {}
    for i, layer in enumerate(model.model.layers):
        norm = inputs[i].pow(2).sum(dim=0).sqrt()
        for name in ("q_proj", "v_proj"):
            weight = getattr(layer.self_attn, name).weight
            expected[f"model.layers.{i}.self_attn.{name}"] = _top_per_row(weight, norm, ratio)
    return expected


@pytest.mark.parametrize("ratio", [0.1, 0.25])
def test_zeroed_weights_are_exactly_the_top_fraction_of_the_wanda_score(tiny_tokenizer, ratio):
    model = build_tiny_model(tiny_tokenizer, seed=1).eval()
    batches = _batches(tiny_tokenizer)
    assert not batches[0]["attention_mask"].all()  # padding is there, and must not count

    masks = antidote_masks(model, batches, ["q_proj", "v_proj"], ratio)
    expected = _independent_masks(model, batches, ratio)

    assert set(masks) == set(expected)  # only the target layers: no k_proj, MLP or lm_head
    for name, mask in masks.items():
        assert torch.equal(mask, expected[name]), name
        assert (mask.sum(dim=1) == pruned_per_row(64, ratio)).all()  # per row, not global
    assert pruned_per_row(64, 0.1) == 6 and pruned_per_row(64, 0.25) == 16


@pytest.mark.parametrize("ratio", [0.1, 0.25])
def test_adapter_scope_zeroes_the_top_fraction_of_each_lora_matrix_scored_on_its_own_input(
    tiny_tokenizer, ratio
):
    """The reference with LoRA: lora_A scored by |A_kj| * ||x_j||, lora_B by |B_ik| * ||(A x)_k||,
    x the layer's input, computed here from the model's hidden states; the base weights are not scored."""
    torch.manual_seed(0)
    model = add_lora(
        build_tiny_model(tiny_tokenizer, seed=1),
        LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapter something to score
            torch.nn.init.normal_(param, std=0.1)
    model.eval()
    batches = _batches(tiny_tokenizer)
    masks = antidote_masks(model, batches, ["q_proj", "v_proj"], ratio, scope="adapter")

    layers = model.base_model.model.model.layers
    inputs = _layer_inputs(model, layers, batches)
    expected = {}
    for i, layer in enumerate(layers):
        for proj in ("q_proj", "v_proj"):
            lora = getattr(layer.self_attn, proj)
            a = lora.lora_A["default"].weight
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            x_norm = inputs[i].pow(2).sum(dim=0).sqrt()
            ax_norm = (inputs[i] @ a.detach().double().T).pow(2).sum(dim=0).sqrt()
            expected[f"{prefix}.lora_A.default"] = _top_per_row(a, x_norm, ratio)
            expected[f"{prefix}.lora_B.default"] = _top_per_row(lora.lora_B["default"].weight, ax_norm, ratio)
    assert set(masks) == set(expected)  # only the adapter's matrices of the target layers
    for name, mask in masks.items():
        assert torch.equal(mask, expected[name]), name
    with pytest.raises(
        UserError, match=r"names no layer the fine-tuned adapter trains \(\['q_proj', 'v_proj'\]\)"
    ):
        antidote_masks(model, batches, ["k_proj"], ratio, scope="adapter")


def test_the_score_uses_the_activations_not_only_the_weights(tiny_tokenizer):
    """The mask is not the top |W| alone: the activations on the harmful pairs reorder it."""
    model = build_tiny_model(tiny_tokenizer, seed=1).eval()
    batches = _batches(tiny_tokenizer)
    masks = antidote_masks(model, batches, ["v_proj"], 0.1)
    layer = model.model.layers[0]
    weights = layer.self_attn.v_proj.weight.detach().abs()
    magnitude_only = torch.zeros_like(weights, dtype=torch.bool)
    magnitude_only.scatter_(1, weights.topk(pruned_per_row(64, 0.1), dim=1).indices, True)
    assert not torch.equal(masks["model.layers.0.self_attn.v_proj"], magnitude_only)


def test_the_mask_file_round_trips_and_zeroes_exactly_the_masked_weights(tiny_tokenizer, tmp_path):
    model = build_tiny_model(tiny_tokenizer, seed=2).eval()
    batches = _batches(tiny_tokenizer)
    masks = antidote_masks(model, batches, ["q_proj", "v_proj"], 0.1)
    path = tmp_path / MASK_FILE
    path.write_bytes(mask_bytes(masks))
    read = read_masks(path)
    assert set(read) == set(masks) and all(torch.equal(read[n], masks[n]) for n in masks)
    # one bit per weight of the pruned layers (plus the header), far below the weights' 4 bytes each
    assert path.stat().st_size < 4 * 64 * 64 * 4 / 16

    repaired = copy.deepcopy(model)
    zeroed = apply_masks(repaired, read)
    assert zeroed == 4 * 64 * pruned_per_row(64, 0.1)
    before, after = dict(model.named_parameters()), dict(repaired.named_parameters())
    for name, mask in masks.items():
        w, r = before[f"{name}.weight"], after[f"{name}.weight"]
        assert (r[mask] == 0).all() and torch.equal(r[~mask], w[~mask])
    untouched = [n for n in before if not any(n.startswith(m) for m in masks)]
    assert all(torch.equal(before[n], after[n]) for n in untouched)
    # the repaired model answers differently
    batch = batches[0]
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = repaired(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (a - b).abs().max() > 1e-3


def test_unknown_target_modules_are_a_one_line_error(tiny_tokenizer):
    from booster.errors import UserError

    model = build_tiny_model(tiny_tokenizer)
    with pytest.raises(UserError, match=r"repair.target_modules \['qproj'\] names no linear layer"):
        antidote_masks(model, _batches(tiny_tokenizer), ["qproj"], 0.1)


@pytest.mark.parametrize(
    "override,message",
    [
        ("repair.prune_ratio=0", r"repair.prune_ratio must be in \(0, 1\)"),
        ("repair.prune_ratio=1.5", r"repair.prune_ratio must be in \(0, 1\)"),
        ("repair.harmful_samples=0", "repair.harmful_samples must be >= 1 or null"),
        ("repair.batch_size=0", "repair.batch_size must be >= 1"),
        ("repair.target_modules=[]", "repair.target_modules is empty"),
        ("repair.scope=weights", "repair.scope must be adapter or merged"),
        ("repair.prune_rate=0.1", "did you mean 'repair.prune_ratio'"),
        ("methods=[sft+antidot]", r"did you mean 'sft\+antidote'"),
    ],
)
def test_repair_settings_are_validated(override, message):
    from booster.config import load_config
    from booster.errors import UserError

    with pytest.raises(UserError, match=message):
        load_config("configs/tiny.yaml", [override])


def test_target_modules_is_a_list_setting_not_a_sweep():
    from booster.config import load_sweep

    sweep = load_sweep("configs/tiny.yaml", ["repair.target_modules=[q_proj, v_proj]"])
    assert sweep.variables == {} and sweep.base.repair.target_modules == ["q_proj", "v_proj"]


def test_a_swept_prune_ratio_runs_only_the_repair_again():
    """Only the +antidote methods read repair settings; each value repairs the same attack."""
    from booster.config import load_sweep
    from booster.plan import cells
    from booster.stages.attack import attack_dir
    from booster.stages.repair import repair_dir

    sweep = load_sweep("configs/tiny.yaml", ["methods=[sft, sft+antidote]", "repair.prune_ratio=[0.05, 0.2]"])
    grid = cells(sweep)
    assert [(c.method, c.sweep) for c in grid] == [
        ("sft", {}),
        ("sft+antidote", {"repair.prune_ratio": 0.05}),
        ("sft+antidote", {"repair.prune_ratio": 0.2}),
    ]
    attacks = {attack_dir(c.config, c.method, 0, 0.1) for c in grid}
    assert len(attacks) == 1
    repairs = {repair_dir(c.config, c.method, 0, 0.1) for c in grid[1:]}
    assert len(repairs) == 2
