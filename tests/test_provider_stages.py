"""The provider's three stages end to end: `booster run` on the tiny config with an alignment-stage
defense, safety data mixing (fine-tuning stage) and Antidote (post-fine-tuning stage)."""

from __future__ import annotations

import json

import pytest
import torch

from booster.cli import main
from booster.config import load_config
from booster.data.records import Example
from booster.data.sources import load_alignment, load_harmful
from booster.data.template import tokenize_examples
from booster.methods.antidote import antidote_masks
from booster.models import build_tiny_tokenizer, load_trained, merge_adapter
from booster.pruning import MASK_FILE, read_masks
from booster.stages import attack as attack_stage
from booster.stages.attack import attack_dir
from booster.stages.repair import repair_dir, repair_settings
from booster.training import default_collator

TINY = "configs/tiny.yaml"
METHODS = ["sft", "sft+mix", "sft+antidote", "booster+antidote"]
SETS = [f"methods=[{','.join(METHODS)}]", "attack.max_steps=3"]


def _run(out, *extra: str, command: str = "run") -> int:
    argv = [command, "--config", TINY, "--output-dir", str(out), "--no-progress"]
    return main([*argv, *(x for s in [*SETS, *extra] for x in ("--set", s))])


@pytest.fixture(scope="module")
def provider_run(tmp_path_factory):
    """One run of the four methods; the rows each attack trained on, by method."""
    out = tmp_path_factory.mktemp("provider")
    seen: dict[str, list[Example]] = {}
    original = attack_stage.tokenize_examples

    def recording(examples, *args, **kwargs):
        seen.setdefault(f"call{len(seen)}", list(examples))
        return original(examples, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attack_stage, "tokenize_examples", recording)
        assert _run(out) == 0
    return out, seen


def test_every_method_gets_the_same_entries_and_shares_the_stages_it_does_not_change(provider_run):
    out, _ = provider_run
    results = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["stage"]) for r in results} == {
        (m, s) for m in METHODS for s in ("aligned", "attacked")
    }
    for r in results:
        for key in ("harmful_score", "harmful_score_plus", "refusal_rate", "finetune_accuracy"):
            assert r[key] is not None, (r["method"], r["stage"], key)
    # alignment once per alignment method, attacks once per fine-tuning (sft+antidote repairs sft's)
    assert sorted(p.name.split("-seed")[0] for p in (out / "align").iterdir()) == ["booster", "sft"]
    assert sorted(p.name.split("-seed")[0] for p in (out / "attack").iterdir()) == [
        "booster",
        "sft",
        "sft+mix",
    ]
    assert sorted(p.name.split("-seed")[0] for p in (out / "repair").iterdir()) == [
        "booster+antidote",
        "sft+antidote",
    ]
    rows = {(r["method"], r["stage"]): r for r in results}
    assert rows["sft+antidote", "aligned"]["harmful_score"] == rows["sft", "aligned"]["harmful_score"]
    # the repaired model is evaluated in the repair folder, with the attack's training numbers
    repaired, attacked = rows["sft+antidote", "attacked"], rows["sft", "attacked"]
    assert repaired["evaluation"].startswith("repair/sft+antidote-seed0-p0.1-")
    assert repaired["provenance"]["stage_dir"].startswith("repair/")
    assert (
        repaired["train_loss"] == attacked["train_loss"]
        and repaired["probe_loss_start"] == attacked["probe_loss_start"]
    )
    # the tiny Llama's adapter: 2 layers x q/k/v (the LoRA targets) x (lora_A 8 x 64, lora_B 64 x 8);
    # per row round(0.1 x 64) = 6 of lora_A's weights and round(0.1 x 8) = 1 of lora_B's
    assert repaired["repair"] == {
        "repair": "antidote",
        "prune_ratio": 0.1,
        "scope": "adapter",
        "realignment_samples": 12,
        "pruned_layers": 12,
        "pruned_weights": 6 * (8 * 6 + 64 * 1),
        "scored_weights": 6 * 2 * 64 * 8,
    }
    assert rows["sft+mix", "attacked"]["safety_samples"] == 2
    report = (out / "report.md").read_text()
    assert "| sft+mix |" in report and "| sft+antidote |" in report and "| booster+antidote |" in report
    assert "- repair (+antidote): Antidote zeroes the top 0.1 of each output row" in report
    assert "- safety data mixing (+mix): round(0.1 x n) refusal pairs" in report


def test_the_mix_attack_trained_on_the_users_rows_plus_refusal_pairs_of_the_alignment_data(provider_run):
    out, seen = provider_run
    config = load_config(TINY, SETS)
    done = json.loads((attack_dir(config, "sft+mix", 0, 0.1, out) / "done.json").read_text())
    assert (done["samples"], done["harmful_samples"], done["safety_samples"]) == (20, 2, 2)
    runs = list(seen.values())
    mixed = next(rows for rows in runs if len(rows) == 22)  # 20 user rows + round(0.1 x 20) refusals
    plain = [rows for rows in runs if len(rows) == 20]
    assert len(plain) == 2  # sft's and booster's attacks: nothing added
    pool = set(load_alignment(config.align.alignment_data, limit=config.align.alignment_samples, seed=0))
    refusals = [e for e in mixed if e.kind == "refusal"]
    assert len(refusals) == 2 and all(e in pool for e in refusals)
    assert sorted(map(repr, [e for e in mixed if e.kind != "refusal"])) == sorted(map(repr, plain[0]))


def _realignment_batches(config):
    """The repair's harmful pairs, batched another way than the stage batches them."""
    pairs = load_harmful(config.repair.harmful_data, limit=config.repair.harmful_samples, seed=0)
    tokenizer = build_tiny_tokenizer()
    rows = tokenize_examples(pairs, tokenizer, config.repair.max_length)
    collate = default_collator(tokenizer)
    return [collate(rows[i : i + 5]) for i in range(0, len(rows), 5)]


def test_the_repair_stores_a_mask_and_the_evaluated_model_is_the_attacked_one_with_it_applied(provider_run):
    """Adapter scope (the reference with LoRA): the mask names the attack adapter's own lora_A /
    lora_B matrices; the repaired model is the base model plus that adapter with those zeroed."""
    out, _ = provider_run
    config = load_config(TINY, SETS)
    stage = repair_dir(config, "sft+antidote", 0, 0.1, out)
    files = sorted(p.name for p in stage.iterdir() if not p.name.startswith("."))
    assert [f for f in files if not f.startswith(("eval-", "generations-"))] == [
        "config.yaml",
        "done.json",
        MASK_FILE,
    ]
    # one bit per weight of the 12 pruned adapter matrices (plus a header naming them): far below a
    # float32 copy of those matrices (4 bytes a weight)
    assert (stage / MASK_FILE).stat().st_size < 12 * 64 * 8 * 4 / 4
    done = json.loads((stage / "done.json").read_text())
    attacked = attack_dir(config, "sft", 0, 0.1, out)
    assert done["recipe"]["adapter"] == f"attack/{attacked.name}/model"
    assert done["recipe"]["prune_scope"] == "adapter"

    plain_recipe = {k: v for k, v in done["recipe"].items() if k not in ("prune", "prune_scope")}
    adapter, _ = load_trained(config.model, plain_recipe, out)
    masks = read_masks(stage / MASK_FILE)
    layers = {f"model.layers.{i}.self_attn.{m}_proj.lora_{ab}" for i in (0, 1) for m in "qkv" for ab in "AB"}
    assert {n.removeprefix("base_model.model.").rsplit(".", 1)[0] for n in masks} == layers
    recomputed = antidote_masks(
        adapter, _realignment_batches(config), ["q_proj", "k_proj", "v_proj"], 0.1, "adapter"
    )
    assert set(recomputed) == set(masks) and all(torch.equal(recomputed[n], masks[n]) for n in masks)

    # the repaired model, independently: W + scaling * (B with its mask zeroed) @ (A with its mask zeroed)
    modules = dict(adapter.named_modules())
    expected = {}
    for name in {n.rsplit(".lora_", 1)[0] for n in masks}:
        layer = modules[name]
        a = layer.lora_A["default"].weight.detach().clone()
        b = layer.lora_B["default"].weight.detach().clone()
        a[masks[f"{name}.lora_A.default"]] = 0
        b[masks[f"{name}.lora_B.default"]] = 0
        assert (layer.lora_A["default"].weight[masks[f"{name}.lora_A.default"]] != 0).all()
        base = layer.base_layer.weight.detach()
        expected[name.removeprefix("base_model.model.") + ".weight"] = base + layer.scaling["default"] * b @ a
    before = dict(merge_adapter(adapter).named_parameters())
    after, _ = load_trained(config.model, done["recipe"], out)
    a = dict(after.named_parameters())
    assert set(a) == set(before) and set(expected) <= set(a)  # merged: no adapter left
    for name, weight in a.items():
        if name in expected:
            assert torch.allclose(weight, expected[name], atol=1e-6) and not torch.equal(weight, before[name])
        else:
            assert torch.equal(weight, before[name]), name  # the base model stays whole


def test_merged_scope_zeroes_the_merged_models_top_weights(tmp_path):
    """``repair.scope: merged``: the top fraction of the merged fine-tuned model's q/k/v weights."""
    sets = ["repair.scope=merged", "methods=[sft+antidote]"]
    assert _run(tmp_path, *sets) == 0
    config = load_config(TINY, [*SETS, *sets])
    stage = repair_dir(config, "sft+antidote", 0, 0.1, tmp_path)
    done = json.loads((stage / "done.json").read_text())
    assert done["scope"] == "merged" and done["recipe"]["prune_scope"] == "merged"
    assert (done["pruned_layers"], done["pruned_weights"]) == (6, 6 * 64 * 6)  # 64 rows x round(6.4)
    plain_recipe = {k: v for k, v in done["recipe"].items() if k not in ("prune", "prune_scope")}
    before = merge_adapter(load_trained(config.model, plain_recipe, tmp_path)[0])
    after, _ = load_trained(config.model, done["recipe"], tmp_path)
    masks = read_masks(stage / MASK_FILE)
    assert set(masks) == {f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qkv"}
    recomputed = antidote_masks(before, _realignment_batches(config), ["q_proj", "k_proj", "v_proj"], 0.1)
    assert all(torch.equal(recomputed[n], masks[n]) for n in masks)
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert set(a) == set(b)
    for name in b:
        mask = masks.get(name.removesuffix(".weight"))
        if mask is None:
            assert torch.equal(a[name], b[name]), name
        else:
            assert (a[name][mask] == 0).all() and (b[name][mask] != 0).all()
            assert torch.equal(a[name][~mask], b[name][~mask])
    assert repair_dir(config, "sft+antidote", 0, 0.1, tmp_path) != repair_dir(
        load_config(TINY, SETS), "sft+antidote", 0, 0.1, tmp_path
    )  # the scope is part of the repair's fingerprint, except merged, the rule before scopes existed,
    # so that the stages repaired by that rule keep their folders
    assert (
        "scope" not in repair_settings(config)
        and repair_settings(load_config(TINY, SETS))["scope"] == "adapter"
    )


def test_rerunning_reuses_every_stage_and_booster_ls_lists_the_repairs(provider_run, capsys):
    out, _ = provider_run
    results = (out / "results.json").read_bytes()
    masks = {p: p.stat().st_mtime_ns for p in (out / "repair").glob(f"*/{MASK_FILE}")}
    assert _run(out) == 0
    assert (out / "results.json").read_bytes() == results
    assert {p: p.stat().st_mtime_ns for p in masks} == masks
    capsys.readouterr()
    assert main(["ls", str(out), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    repairs = [row for row in listed if row["stage"] == "repair"]
    assert sorted(r["method"] for r in repairs) == ["booster+antidote", "sft+antidote"]
    assert all(r["status"] == "done" for r in repairs)


def test_booster_evaluate_reports_the_repaired_model_like_run_does(provider_run, tmp_path):
    out, _ = provider_run
    before = {
        (r["method"], r["stage"]): r["harmful_score"] for r in json.loads((out / "results.json").read_text())
    }
    assert _run(out, command="evaluate") == 0
    after = json.loads((out / "results.json").read_text())
    repaired = next(r for r in after if r["method"] == "sft+antidote" and r["stage"] == "attacked")
    assert repaired["evaluation"].startswith("repair/") and repaired["repair"]["pruned_weights"] == 672
    assert {(r["method"], r["stage"]): r["harmful_score"] for r in after} == before


def test_export_refuses_the_aligned_model_and_merges_the_repaired_one(provider_run, tmp_path, capsys):
    from booster.errors import UserError
    from booster.export import export_model

    out, _ = provider_run
    with pytest.raises(
        UserError, match="sft\\+antidote acts after the user's fine-tuning.*export --method sft"
    ):
        export_model(out, tmp_path / "a", "sft+antidote")
    with pytest.raises(UserError, match="sft\\+mix acts during the user's fine-tuning"):
        export_model(out, tmp_path / "b", "sft+mix")
    with pytest.raises(UserError, match="export it with --merged"):
        export_model(out, tmp_path / "c", "sft+antidote", stage="attacked")
    export = export_model(out, tmp_path / "d", "sft+antidote", stage="attacked", merged=True)
    assert export.stage.path.parent.name == "repair"
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "d" / "model.safetensors"))
    config = load_config(TINY, SETS)
    stage = repair_dir(config, "sft+antidote", 0, 0.1, out)
    repaired, _ = load_trained(config.model, json.loads((stage / "done.json").read_text())["recipe"], out)
    for name, weight in repaired.state_dict().items():
        assert torch.equal(weights[name], weight), name  # the export is the repaired model
    card = (tmp_path / "d" / "README.md").read_text()
    assert "repaired by antidote: 672 of 6,144 weights of the fine-tuned adapter zeroed" in card


def test_booster_methods_lists_every_defense_and_the_stages_it_acts_at(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:] if line and not line.startswith("+")}
    assert "post-fine-tuning" in rows["sft+antidote"] and "alignment" not in rows["sft+antidote"]
    assert "alignment, fine-tuning" in rows["booster+mix"]
    assert "alignment, fine-tuning, post-fine-tuning" in rows["booster+lisa+antidote"]
    assert "none (the baseline)" in rows["sft"]


def test_the_dry_run_plans_the_added_rows_and_the_repair(tmp_path):
    from booster import cost
    from booster.config import load_sweep
    from booster.dryrun import cost_lines, estimate, plan_lines

    sets = ["methods=[sft, sft+mix, sft+antidote]", "attack.max_steps=-1", "attack.epochs=1"]
    sweep = load_sweep(TINY, sets)
    plan = {e.cell.method: e for e in estimate(sweep, tmp_path)}
    # one epoch at batch 4: the user's 20 rows take 5 steps, with 2 refusal pairs added 6
    assert (plan["sft"].attack_steps, plan["sft+mix"].attack_steps) == (5, 6)
    antidote = plan["sft+antidote"]
    assert (antidote.attacks, antidote.repairs, antidote.repair_batches) == (
        0,
        1,
        3,
    )  # sft's attack, 12 pairs
    assert [s.kind for s in antidote.stages] == ["repair"]
    assert [e.path.parent.parent.name for e in antidote.evaluations] == ["repair"]
    lines = {line.split()[1]: line for line in plan_lines(sweep, list(plan.values()))[1:4]}
    assert "attack n=20 + 2 safety" in lines["sft+mix"]
    assert "repair 1 x 3 forward batches of 4" in lines["sft+antidote"]
    size = cost.model_size(sweep.base.model)
    rows = {line.split()[1]: line.split() for line in cost_lines(sweep, list(plan.values()), size)[2:5]}
    tokens = 3 * 4 * 64  # forward batches x batch x repair.max_length
    assert rows["sft+antidote"][3] == cost.format_count(tokens)
    assert rows["sft+antidote"][4] == cost.format_flops(tokens * 2.0 * size.parameters)


def test_booster_methods_json_says_which_stages_each_method_shares(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {row["method"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["booster+mix+antidote"]["aligns_like"] == "booster"
    assert rows["booster+mix+antidote"]["attacks_like"] == "booster+mix"
    assert rows["booster+mix+antidote"]["settings"] == ["lamb", "alpha", "safety_mix_ratio"]
    assert rows["sft+antidote"]["stages"] == "post-fine-tuning"
