"""The two Booster variants through ``booster run``, and the probe of every aligned model.

``booster-from-sft`` starts from the SFT stage of its seed (trained first, once, and reused);
``booster+ascent`` adds the bounded ascent (its gradient is checked in test_booster_step.py); every
aligned model gets the harmful-loss probe before any attack.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import booster.stages.align as align_stage
from booster.cli import main
from booster.config import load_config
from booster.errors import UserError
from booster.stages.align import align_dir, align_settings, fingerprint
from booster.storage import file_records

TINY = ["--config", "configs/tiny.yaml", "--no-progress"]
SHORT = ["align.max_steps=2", "attack.max_steps=2", "attack.logging_steps=1"]
ADAPTER = "adapter_model.safetensors"


def sets(*overrides: str) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


class Recorder:
    """Wraps the align stage's training and model loading: which alignments trained, and the
    trainable weights each started from when it started from an adapter."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.trained: list[str] = []
        self.starts: list[dict[str, torch.Tensor]] = []
        train, load = align_stage._align, align_stage.load_trained

        def recording_align(config, method, *args, **kwargs):
            self.trained.append(method)
            return train(config, method, *args, **kwargs)

        def recording_load(*args, **kwargs):
            model, tokenizer = load(*args, **kwargs)
            named = model.named_parameters()
            self.starts.append(
                {n.replace(".default", ""): p.detach().clone() for n, p in named if p.requires_grad}
            )
            return model, tokenizer

        monkeypatch.setattr(align_stage, "_align", recording_align)
        monkeypatch.setattr(align_stage, "load_trained", recording_load)


def stage(root: Path, method: str) -> Path:
    (found,) = [p for p in (root / "align").iterdir() if p.name.startswith(f"{method}-seed0-")]
    return found


def same_weights(start: dict[str, torch.Tensor], adapter: Path) -> bool:
    saved = load_file(str(adapter / ADAPTER))
    return sorted(start) == sorted(saved) and all(torch.equal(start[k], saved[k]) for k in saved)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One grid on the tiny config: the variant listed before SFT (so it must train SFT itself), and
    booster+ascent with a target the tiny model's harmful loss (~6) stays below, so the ascent acts."""
    out = tmp_path_factory.mktemp("variants")
    with pytest.MonkeyPatch.context() as patch:
        record = Recorder(patch)
        methods = "methods=[booster-from-sft, sft, booster+ascent]"
        argv = ["run", *TINY, "--output-dir", str(out), *sets(methods, "align.ascent_target=100", *SHORT)]
        assert main(argv) == 0
    return out, record, argv


def test_booster_from_sft_trains_sft_once_and_starts_from_its_adapter(run):
    out, record, _ = run
    # the SFT stage ran first (for the variant), once; the SFT cell reused it
    assert record.trained == ["sft", "booster-from-sft", "booster+ascent"]
    (start,) = record.starts  # only the variant started from an adapter
    sft = stage(out, "sft")
    assert same_weights(start, sft / "model")
    assert any(k.endswith("lora_B.weight") and start[k].abs().max() > 0 for k in start), "not a fresh LoRA"
    done = json.loads((stage(out, "booster-from-sft") / "done.json").read_text())
    assert done["init_adapter"] == f"align/{sft.name}"
    assert f"../{sft.name}/model/{ADAPTER}" in done["files"]  # redone when SFT's model changes


def test_booster_plus_ascent_runs_its_ascent(run):
    out, _, _ = run
    lines = [json.loads(x) for x in (stage(out, "booster+ascent") / "metrics.jsonl").read_text().splitlines()]
    logged = [x["harmful_ascent"] for x in lines if "harmful_ascent" in x]
    assert logged and all(v == pytest.approx(0.1) for v in logged)  # the default weight, below the target
    booster_lines = (stage(out, "booster-from-sft") / "metrics.jsonl").read_text()
    assert "harmful_ascent" not in booster_lines


def test_every_aligned_model_has_the_probe_beside_its_hs(run):
    out, _, _ = run
    results = json.loads((out / "results.json").read_text())
    aligned = {r["method"]: r for r in results if r["stage"] == "aligned"}
    assert set(aligned) == {"booster-from-sft", "sft", "booster+ascent"}
    for entry in aligned.values():
        assert entry["probe_loss"] > 0 and entry["probe_grad_norm"] > 0
    attacked = {r["method"]: r for r in results if r["stage"] == "attacked"}
    for method, entry in aligned.items():
        # single_lora: the attack's step 0 measures the same model on the same pairs
        assert entry["probe_loss"] == pytest.approx(attacked[method]["probe_loss_start"], rel=1e-5)
        assert entry["probe_grad_norm"] == pytest.approx(attacked[method]["probe_grad_norm_start"], rel=1e-4)
        assert "probe_loss" not in attacked[method]
    assert aligned["sft"]["probe_loss"] != aligned["booster+ascent"]["probe_loss"]
    report = (out / "report.md").read_text()
    assert "| method | aligned HS | probe loss | probe grad norm |" in report
    assert f"| sft | {aligned['sft']['harmful_score']:.1f}" in report
    assert f"{aligned['sft']['probe_loss']:.3f}" in report


def test_a_rerun_reuses_every_stage_and_probe(run, monkeypatch):
    out, _, argv = run
    before = (out / "results.json").read_bytes()
    probes = {p: p.stat().st_mtime_ns for p in (out / "align").glob("*/probe-*.json")}
    assert len(probes) == 3
    record = Recorder(monkeypatch)
    assert main(argv) == 0
    assert record.trained == [] and record.starts == []
    assert (out / "results.json").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in probes} == probes


def test_an_archive_keeps_the_aligned_probe(run, tmp_path):
    out, _, argv = run
    dest = tmp_path / "archive"
    assert main(["archive", str(out), str(dest)]) == 0
    assert len(list((dest / "align").glob("*/probe-*.json"))) == 3
    overrides = argv[argv.index("--set") :]
    assert main(["report", str(dest), "--config", "configs/tiny.yaml", *overrides]) == 0
    results = json.loads((dest / "results.json").read_text())
    aligned = [r for r in results if r["stage"] == "aligned"]
    assert len(aligned) == 3 and all(r["probe_loss"] > 0 for r in aligned)
    assert "| method | aligned HS | probe loss | probe grad norm |" in (dest / "report.md").read_text()


def test_probe_aligned_off_leaves_the_aligned_entries_without_it(run, tmp_path):
    out, _, _ = run
    argv = ["evaluate", *TINY, "--output-dir", str(out), *sets("methods=[sft]", *SHORT)]
    assert main([*argv, *sets("evaluate.probe_aligned=false")]) == 0
    results = json.loads((out / "results.json").read_text())
    (sft,) = [r for r in results if r["method"] == "sft" and r["stage"] == "aligned"]
    assert "probe_loss" not in sft
    assert main(argv) == 0  # on again: the stored probe comes back
    results = json.loads((out / "results.json").read_text())
    (sft,) = [r for r in results if r["method"] == "sft" and r["stage"] == "aligned"]
    assert sft["probe_loss"] > 0


def test_a_changed_sft_model_makes_the_variant_train_again(run, monkeypatch, capsys):
    out, _, argv = run
    sft = stage(out, "sft")
    weights = load_file(str(sft / "model" / ADAPTER))
    save_file({k: v * 1.5 for k, v in weights.items()}, str(sft / "model" / ADAPTER))
    done = json.loads((sft / "done.json").read_text())  # SFT itself stays valid: as if trained again
    done["files"] = file_records(sft, [sft / name for name in done["files"]])
    (sft / "done.json").write_text(json.dumps(done))
    record = Recorder(monkeypatch)
    variant = ["run", *TINY, "--output-dir", str(out), *sets("methods=[booster-from-sft]", *SHORT)]
    assert main(variant) == 0
    assert record.trained == ["booster-from-sft"]
    assert same_weights(record.starts[0], sft / "model")
    assert "does not match its recorded hash" in capsys.readouterr().err


def test_the_variants_fingerprint_holds_the_sft_stage():
    config = load_config("configs/tiny.yaml")
    sft = fingerprint(*align_settings(config, "sft"))
    assert align_settings(config, "booster-from-sft")[1]["init_adapter"] == f"sft:{sft}"
    assert "init_adapter" not in align_settings(config, "booster")[1]
    # a change to the SFT stage (here its learning rate) renames the variant's stage
    changed = load_config("configs/tiny.yaml", ["align.learning_rate=2e-3"])
    assert align_dir(changed, "sft", 0) != align_dir(config, "sft", 0)
    assert align_dir(changed, "booster-from-sft", 0) != align_dir(config, "booster-from-sft", 0)
    # Booster's own settings rename the variant, not the SFT stage it starts from
    lamb = load_config("configs/tiny.yaml", ["align.lamb=7"])
    assert align_dir(lamb, "sft", 0) == align_dir(config, "sft", 0)
    assert align_dir(lamb, "booster-from-sft", 0) != align_dir(config, "booster-from-sft", 0)
    # init_adapter names the start of the other methods: SFT itself starts from the base model
    started = load_config("configs/tiny.yaml", ["align.init_adapter=sft"])
    assert align_dir(started, "sft", 0) == align_dir(config, "sft", 0)
    assert align_settings(started, "booster")[1]["init_adapter"] == f"sft:{sft}"
    assert align_dir(started, "booster", 0) != align_dir(config, "booster", 0)
    # booster-from-sft keeps its own start (SFT) whatever init_adapter says; SFT then starts from it
    other = load_config("configs/tiny.yaml", ["align.init_adapter=vaccine"])
    vaccine = fingerprint(*align_settings(other, "vaccine"))
    assert align_settings(other, "sft")[1]["init_adapter"] == f"vaccine:{vaccine}"
    sft_from_vaccine = fingerprint(*align_settings(other, "sft"))
    assert align_settings(other, "booster-from-sft")[1]["init_adapter"] == f"sft:{sft_from_vaccine}"


def test_an_adapter_folder_start_is_fingerprinted_by_its_files(run, tmp_path, monkeypatch):
    out, _, _ = run
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("adapter_config.json", ADAPTER):
        (folder / name).write_bytes((stage(out, "sft") / "model" / name).read_bytes())
    config = load_config("configs/tiny.yaml", [f"align.init_adapter={folder}"])
    first = align_dir(config, "booster", 0)
    assert first != align_dir(load_config("configs/tiny.yaml"), "booster", 0)
    # the run starts from the folder's weights
    record = Recorder(monkeypatch)
    argv = ["align", *TINY, "--output-dir", str(tmp_path / "out"), "--method", "booster"]
    assert main([*argv, *sets(f"align.init_adapter={folder}", *SHORT)]) == 0
    assert record.trained == ["booster"] and same_weights(record.starts[0], folder)
    done = json.loads((stage(tmp_path / "out", "booster") / "done.json").read_text())
    assert done["init_adapter"] == str(folder.resolve())
    # other weights in the folder: another stage
    weights = load_file(str(folder / ADAPTER))
    save_file({k: v + 1.0 for k, v in weights.items()}, str(folder / ADAPTER))
    assert align_dir(config, "booster", 0) != first


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("booster: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "value,needle",
    [
        ("sfx", "align.init_adapter='sfx' is not a method (did you mean 'sft'?"),
        ("booster-from-sft", "itself starts from sft's alignment"),
        ("./no/such/adapter", "align.init_adapter: ./no/such/adapter is not a folder"),
        ("EMPTY", "has no adapter_config.json or adapter_model.safetensors"),
    ],
)
def test_bad_starts_are_one_line_errors_before_training(capsys, tmp_path, value, needle):
    if value == "EMPTY":
        value = str(tmp_path / "empty")
        (tmp_path / "empty").mkdir()
    argv = ["run", *TINY, "--output-dir", str(tmp_path / "out"), *sets(f"align.init_adapter={value}")]
    assert needle in one_line_error(capsys, argv)
    assert not (tmp_path / "out" / "align").exists()


def test_an_adapter_start_needs_lora(tmp_path):
    with pytest.raises(UserError, match="model.lora.enabled is false"):
        from booster.config import load_sweep
        from booster.preflight import preflight

        sweep = load_sweep(
            "configs/tiny.yaml", [f"align.init_adapter={tmp_path}", "model.lora.enabled=false"]
        )
        preflight(sweep, "align")


@pytest.mark.parametrize("sft_first", [False, True])
def test_the_dry_run_counts_the_sft_alignment_the_variant_starts_from_once(tmp_path, sft_first):
    from booster.config import load_sweep
    from booster.dryrun import estimate

    methods = "[sft, booster-from-sft]" if sft_first else "[booster-from-sft, sft]"
    plan = {
        e.cell.method: e for e in estimate(load_sweep("configs/tiny.yaml", [f"methods={methods}"]), tmp_path)
    }
    variant, sft = plan["booster-from-sft"], plan["sft"]
    aligns = [s.label for s in variant.stages if s.kind == "align"]
    if sft_first:  # SFT's cell trains it; the variant adds only its own three passes
        assert aligns == ["align booster-from-sft"] and variant.align_passes == 3
        assert not sft.shared
    else:  # the variant's cell trains SFT first: its passes and stages count it, SFT's cell shares it
        assert aligns == ["align sft", "align booster-from-sft"] and variant.align_passes == 3 + 1
        assert sft.shared and len(sft.evaluations) == 2  # SFT's own evaluation is still its cell's
