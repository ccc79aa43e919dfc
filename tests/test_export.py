"""``booster export``: adapters that peft loads on the real base, merged weights, the model card, and
the hub upload up to the network call."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch

from booster.cli import main
from booster.config import load_config
from booster.stages.align import align_dir
from booster.stages.attack import attack_dir
from booster.storage import read_done
from tests.test_chat_template import save_chatml_base


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """``booster run`` (booster only, tiny sizes) on a local tiny chat model with model.template: chat,
    recording the template every stage tokenises with and the stop tokens evaluation passes."""
    from booster.evaluation import generation
    from booster.stages import align, attack

    tmp = tmp_path_factory.mktemp("chat-run")
    base = save_chatml_base(tmp / "base-model")
    templates, stops = [], []

    def recording(tokenize):
        def wrapper(examples, tokenizer, max_length, template="alpaca"):
            templates.append(template)
            return tokenize(examples, tokenizer, max_length, template)

        return wrapper

    real_generate = generation.generate

    def generate(*args, **kwargs):
        stops.append(kwargs.get("eos_token_id"))
        return real_generate(*args, **kwargs)

    overrides = [f"model.name={base}", "model.template=chat", "methods=[booster]"]
    argv = ["run", "--config", "configs/tiny.yaml", "--output-dir", str(tmp / "run"), "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(align, "tokenize_examples", recording(align.tokenize_examples))
        mp.setattr(attack, "tokenize_examples", recording(attack.tokenize_examples))
        mp.setattr(generation, "generate", generate)
        assert main(argv + [x for o in overrides for x in ("--set", o)]) == 0
    config = load_config("configs/tiny.yaml", [*overrides, f"output_dir={tmp / 'run'}"])
    return {"root": tmp / "run", "base": base, "config": config, "templates": templates, "stops": stops}


def _logits(model, tokenizer):
    from booster.data.template import encode_prompt, format_prompt

    ids = encode_prompt(tokenizer, format_prompt("How do I pick a lock?", "", tokenizer, "chat"))
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_every_stage_used_the_chat_template(chat_run):
    assert chat_run["templates"] and set(chat_run["templates"]) == {"chat"}
    from transformers import AutoTokenizer

    im_end = AutoTokenizer.from_pretrained(chat_run["base"]).convert_tokens_to_ids("<|im_end|>")
    assert chat_run["stops"] and all(s == [im_end] for s in chat_run["stops"])


def test_adapter_export_loads_with_peft_on_the_named_base(chat_run, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from booster.models import load_trained

    out = tmp_path / "export"
    assert main(["export", str(chat_run["root"]), str(out), "--method", "booster", "--seed", "0"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md"} <= files
    assert "booster_export.json" in files and not any(f.endswith(".bin") for f in files)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(chat_run["base"].resolve())

    config = chat_run["config"]
    stage = align_dir(config, "booster", 0)
    trained, tokenizer = load_trained(config.model, read_done(stage)["recipe"], chat_run["root"])
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out))
    exported_tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    torch.testing.assert_close(_logits(loaded, exported_tokenizer), _logits(trained, tokenizer))
    with loaded.disable_adapter():  # the adapter is trained, so matching logits prove it was loaded
        assert not torch.allclose(_logits(loaded, tokenizer), _logits(trained, tokenizer))

    provenance = json.loads((out / "booster_export.json").read_text())
    assert provenance["format"] == "adapter" and provenance["stage"] == "aligned"
    assert provenance["template"] == "chat" and provenance["stage_dir"] == str(stage.resolve())


def test_model_card_reports_method_data_and_the_runs_numbers(chat_run, tmp_path):
    out = tmp_path / "card"
    assert main(["export", str(chat_run["root"]), str(out), "--method", "booster"]) == 0
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and "booster-llm" in card.data.tags
    assert card.data.base_model is None  # a local folder is no hub id
    text = card.text
    results = json.loads((chat_run["root"] / "results.json").read_text())
    aligned = next(r for r in results if r["stage"] == "aligned")
    attacked = next(r for r in results if r["stage"] == "attacked")
    assert "λ (`lamb`) = 5.0" in text and "α (`alpha`) = 0.1" in text
    assert "configs/data/tiny/alignment.jsonl" in text and "configs/data/tiny/harmful.jsonl" in text
    aligned_row = next(line for line in text.splitlines() if line.startswith("| aligned |"))
    attacked_row = next(line for line in text.splitlines() if line.startswith("| after the attack |"))

    def shown(entry, key):  # the value with its 95% interval
        low, high = entry[f"{key}_ci"]
        return f"{entry[key]:.1f} [{low:.1f}, {high:.1f}]"

    assert f"| {shown(aligned, 'harmful_score')} |" in aligned_row
    assert f"| {shown(aligned, 'refusal_rate')} |" in aligned_row and "| keyword |" in aligned_row
    assert f"| {attacked['poison_ratio']:g} | {shown(attacked, 'harmful_score')} |" in attacked_row
    assert "## Intended use and limits" in text and "chat template" in text
    assert "AutoPeftModelForCausalLM" in text
    # the run has no SFT model: no verdict, and the card says how to get one
    assert "the verdict cannot be given: this run has no SFT model to compare with" in text
    assert "Add `sft` to `methods:`" in text and "SFT baseline" not in text


def test_card_numbers_are_the_stages_own_evaluation(chat_run, tmp_path):
    """results.json does not name stage folders: an entry whose numbers are not this stage's own
    evaluation (a later run with other settings) is not put on its card."""
    import shutil

    root = tmp_path / "run"
    shutil.copytree(chat_run["root"], root)
    results = json.loads((root / "results.json").read_text())
    real = next(r for r in results if r["stage"] == "aligned")["harmful_score"]
    for r in results:
        r["harmful_score"] = 33.3
    (root / "results.json").write_text(json.dumps(results))
    assert main(["export", str(root), str(tmp_path / "out"), "--method", "booster"]) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| aligned |"))
    assert f"| {real:.1f} [" in row and "33.3" not in text


def test_card_shows_intervals_when_results_have_them(chat_run, tmp_path):
    from booster.export import _value

    entry = {"harmful_score": 12.0, "harmful_score_ci": [8.25, 16.5], "refusal_rate": float("nan")}
    assert _value(entry, "harmful_score") == "12.0 [8.2, 16.5]"
    assert _value(entry, "refusal_rate") == "n/a"


def test_attacked_model_exports_merged_full_weights(chat_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from booster.models import load_trained

    out = tmp_path / "merged"
    argv = [
        "export",
        str(chat_run["root"]),
        str(out),
        "--method",
        "booster",
        "--poison-ratio",
        "0.1",
        "--merged",
    ]
    assert main(argv) == 0
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "adapter_config.json" not in files
    config = chat_run["config"]
    recipe = read_done(attack_dir(config, "booster", 0, 0.1))["recipe"]
    trained, tokenizer = load_trained(config.model, recipe, chat_run["root"])
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(
        _logits(merged, AutoTokenizer.from_pretrained(str(out))),
        _logits(trained, tokenizer),
        rtol=1e-4,
        atol=1e-5,
    )
    text = (out / "README.md").read_text()
    assert "after a simulated harmful fine-tuning" in text and "research only" in text
    rows = [line for line in text.splitlines() if line.startswith("| after the attack |")]
    assert len(rows) == 1 and "| 0.1 |" in rows[0]
    assert json.loads((out / "booster_export.json").read_text())["format"] == "merged"


def test_tiny_base_is_saved_next_to_the_adapter(tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    from booster.models import load_trained

    root = tmp_path / "run"
    argv = ["align", "--config", "configs/tiny.yaml", "--output-dir", str(root), "--no-progress"]
    assert main([*argv, "--method", "sft", "--set", "seeds=[1]"]) == 0
    out = tmp_path / "out"
    assert main(["export", str(root), str(out), "--method", "sft", "--seed", "1"]) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "base"  # relative: the export can move
    config = load_config("configs/tiny.yaml", [f"output_dir={root}", "seeds=[1]"])
    trained, tokenizer = load_trained(
        config.model, read_done(align_dir(config, "sft", 1))["recipe"], root, seed=1
    )
    monkeypatch.chdir(out)  # peft reads a relative base against the working directory
    loaded = AutoPeftModelForCausalLM.from_pretrained(".")
    torch.testing.assert_close(_logits(loaded, tokenizer), _logits(trained, tokenizer))
    assert "random tiny test model" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--method", "vaccine"], "no finished aligned model of vaccine seed 0"),
        (["--method", "booster", "--seed", "3"], "check --method/--seed"),
        (["--method", "nope"], "unknown method"),
        (["--method", "booster", "--stage", "aligned", "--poison-ratio", "0.1"], "--stage attacked"),
        (
            ["--method", "booster", "--poison-ratio", "0.5"],
            "no finished attacked model of booster seed 0 p=0.5",
        ),
        # Lisa acts during fine-tuning: its "aligned model" would be SFT's under Lisa's name
        (["--method", "lisa"], "lisa acts during the user's fine-tuning, so its aligned model is sft's"),
        (["--method", "booster+lisa"], "export --method booster)"),
        (["--method", "lisa", "--stage", "attacked"], "no finished attacked model of lisa seed 0"),
    ],
)
def test_export_mistakes_are_one_line(chat_run, tmp_path, capsys, extra, needle):
    assert main(["export", str(chat_run["root"]), str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()


def test_a_stage_folder_is_exported_as_itself_and_checked(chat_run, tmp_path, capsys):
    stage = attack_dir(chat_run["config"], "booster", 0, 0.1)
    assert main(["export", str(stage), str(tmp_path / "out"), "--method", "booster"]) == 0
    provenance = json.loads((tmp_path / "out" / "booster_export.json").read_text())
    assert provenance["stage"] == "attacked" and provenance["poison_ratio"] == 0.1
    assert main(["export", str(stage), str(tmp_path / "other"), "--method", "booster", "--seed", "1"]) == 2
    assert "holds the attacked model of booster seed 0 p=0.1" in capsys.readouterr().err


def test_a_second_adapter_exports_only_merged(chat_run, tmp_path, capsys):
    """A double-LoRA recipe (aligned adapter merged, a new adapter on top) has no single adapter."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from booster.models import load_trained
    from booster.storage import write_json_atomic

    config, root = chat_run["config"], chat_run["root"]
    source = attack_dir(config, "booster", 0, 0.1)
    stage = source.with_name(source.name + "-double")
    shutil.copytree(source, stage)
    done = read_done(stage)
    aligned = read_done(align_dir(config, "booster", 0))["recipe"]["adapter"]
    done["recipe"] = {"merge": [aligned], "adapter": str((stage / "model").relative_to(root))}
    write_json_atomic(stage / "done.json", done)
    try:  # the copy must go afterwards: a second attacked model of booster seed 0 would be ambiguous
        expected = _logits(*load_trained(config.model, done["recipe"], root))
        assert main(["export", str(stage), str(tmp_path / "a"), "--method", "booster"]) == 2
        assert "export it with --merged" in capsys.readouterr().err
        assert main(["export", str(stage), str(tmp_path / "m"), "--method", "booster", "--merged"]) == 0
    finally:
        shutil.rmtree(stage)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    got = _logits(merged, AutoTokenizer.from_pretrained(str(tmp_path / "m")))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_export_refuses_a_non_empty_folder(chat_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["export", str(chat_run["root"]), str(tmp_path / "taken"), "--method", "booster"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_push_to_hub_uploads_the_exported_folder(chat_run, tmp_path, monkeypatch, capsys):
    calls = {}

    class Repo:
        url = "https://huggingface.co/me/hardened"

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)
        return Repo()

    def upload_folder(self, **kwargs):
        calls["upload"] = kwargs
        calls["files"] = sorted(p.name for p in (tmp_path / "out").iterdir())

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    argv = ["export", str(chat_run["root"]), str(tmp_path / "out"), "--method", "booster"]
    assert main([*argv, "--push-to-hub", "me/hardened", "--private"]) == 0
    assert calls["create"] == ("me/hardened", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls["upload"]["repo_id"] == "me/hardened"
    assert calls["upload"]["folder_path"] == str(tmp_path / "out")
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json"} <= set(calls["files"])
    assert "pushed to https://huggingface.co/me/hardened" in capsys.readouterr().out


def test_push_without_login_fails_before_exporting(chat_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    argv = ["export", str(chat_run["root"]), str(tmp_path / "out"), "--method", "booster"]
    assert main([*argv, "--push-to-hub", "me/hardened"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not logged in" in err and "hf auth login" in err
    assert not (tmp_path / "out").exists()


def test_push_without_network_is_one_line_and_keeps_the_export(chat_run, tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(self, *args, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    argv = ["export", str(chat_run["root"]), str(tmp_path / "out"), "--method", "booster"]
    assert main([*argv, "--push-to-hub", "me/hardened"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "upload failed (Cannot reach" in err
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "name,revision,expected,hub_id",
    [
        ("embedded", None, "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("meta-llama/Llama-2-7b-hf", "main", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),
    ],
)
def test_adapters_name_the_hub_model(tmp_path, name, revision, expected, hub_id):
    from booster.export import Stage, base_model

    config = load_config(
        None, [f"model.name={name}", f"model.revision={revision}" if revision else "seeds=[0]"]
    )
    stage = Stage(tmp_path / "align" / "x", tmp_path, "aligned", config, {"seed": 0, "recipe": {}})
    base = base_model(stage, save_tiny_to=tmp_path / "base")
    assert (base.name_or_path, base.hub_id, base.revision) == (expected, hub_id, revision)
    if name == "embedded":
        assert base.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert not (tmp_path / "base").exists()
