"""The dry run's GPU cost: parameter counts from the model's config (no weights), tokens, FLOPs,
peak memory and GPU-hours, checked against the paper's measured 1.86 h on one H100."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import LlamaConfig

from booster import cost
from booster.config import load_sweep
from booster.dryrun import cost_lines, estimate, evaluation_size
from booster.models import LoraSettings, ModelConfig, add_lora, build_tiny_model, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
LLAMA2_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}


@pytest.fixture
def llama2_config_only(tmp_path) -> Path:
    """A folder with Llama-2-7B's config.json and no weights."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    return tmp_path


def test_tiny_counts_are_the_real_model(tiny_tokenizer):
    lora = LoraSettings(r=8, alpha=16)
    size = cost.model_size(ModelConfig(name="tiny", lora=lora))
    model = add_lora(build_tiny_model(build_tiny_tokenizer()), lora)
    assert size.parameters == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert size.lora_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    full = cost.model_size(ModelConfig(name="tiny", lora=LoraSettings(enabled=False)))
    assert full.lora_parameters is None and full.trainable == full.parameters


def test_counts_from_a_config_without_weights(llama2_config_only):
    size = cost.model_size(ModelConfig(name=str(llama2_config_only), dtype="bfloat16"))
    assert size.parameters == 6_738_415_616 and size.weight_bytes == 2
    assert size.lora_parameters == 32 * 3 * 32 * (4096 + 4096)  # r (in + out) on q, k, v in 32 layers
    # the formula from hidden size, layers, vocabulary and intermediate size gives the same
    assert cost.formula_parameters(LlamaConfig(**LLAMA2_7B), LoraSettings()) == (
        size.parameters,
        size.lora_parameters,
    )


def test_a_config_that_cannot_be_read_offline_is_unknown():
    assert cost.model_size(ModelConfig(name="nobody/no-such-model")) is None
    lines = cost_lines(load_sweep("configs/tiny.yaml"), estimate(load_sweep("configs/tiny.yaml")), None)
    assert "parameters unknown" in lines[0] and "unknown FLOPs" in lines[-2]


@pytest.mark.slow
def test_embedded_architecture_is_the_gguf_files():
    from transformers import AutoConfig

    from booster.models import EMBEDDED_ARCHITECTURE, embedded_gguf_path

    path = embedded_gguf_path()
    read = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert {k: getattr(read, k) for k in EMBEDDED_ARCHITECTURE} == EMBEDDED_ARCHITECTURE
    assert cost.model_size(ModelConfig(name="embedded")).parameters == 134_515_008


def test_flops_memory_and_hours_of_the_paper_setting(llama2_config_only):
    """One cell of the paper's Llama2-7B config on a config-only copy of the model: the figures
    follow the stated formulas."""
    sweep = load_sweep(
        "configs/paper/llama2-7b-sst2.yaml", [f"model.name={llama2_config_only}", "methods=[sft, booster]"]
    )
    size = cost.model_size(sweep.base.model)
    plan = estimate(sweep)
    lines = cost_lines(sweep, plan, size)
    assert "6.74B parameters, 25.2M trained by LoRA" in lines[0]
    booster = next(line for line in lines if line.split()[1:2] == ["booster"])
    tokens = 10_000 * 10 * 256 + 2_000 * 10 * 256  # alignment + one attack: sequences x max length
    flops = (3 * 10_000 * 10 * 256 + 2_000 * 10 * 256) * (4 * size.parameters + 6 * size.lora_parameters)
    assert f" {cost.format_count(tokens)} " in booster and f" {cost.format_flops(flops)} " in booster
    hours = cost.gpu_hours(flops)  # training: the H100's and the H200's compute are the same
    assert hours[1] == hours[2] == pytest.approx(flops / (989e12 * cost.UTILISATION) / 3600)
    evaluations = cost.evaluation_hours(size, evaluation_size(plan[1].cell.config))  # aligned + attacked
    assert booster.split()[-3:] == [f"{t + 2 * e:.3g}" for t, e in zip(hours, evaluations, strict=True)]
    memory = cost.stage_memory(size, 10, 256, True, False, True)
    weights, state = 6_738_415_616 * 2, size.lora_parameters * (16 + 12)
    activations = 10 * 256 * 32 * (10 * 4096 + 5 * 11008) * 2
    assert memory == weights + state + activations + 10 * 256 * 32000 * 4
    assert cost.format_gib(memory) in booster
    # gradient checkpointing keeps one value per layer and token, plus one block
    assert cost.stage_memory(size, 10, 256, True, True, True) < memory
    grid = lines[-2]
    assert grid.startswith("grid: ") and "GPU-hours (training + 4 evaluations = all) A100 80GB" in grid


def test_the_estimate_is_near_the_papers_measurement_and_the_readme_says_so():
    hours, paper = cost.paper_check()
    assert paper == 1.86 and 0.75 * paper < hours < 1.25 * paper
    readme = (REPO / "README.md").read_text()
    match = re.search(r"estimate: ([\d.]+) h on one H100 .* the paper's 1\.86 h", readme)
    assert match and float(match.group(1)) == round(hours, 2), "the README quotes the current estimate"


def test_the_papers_models_are_estimated_offline_from_their_published_configs():
    """No hub access: the paper configs still get parameter counts (those the model cards state:
    6.74B, 7.62B, 9.24B) and LoRA r=32 on q/k/v (about 25M on Llama-2-7B, as the paper counts)."""
    from booster.cost import model_size
    from booster.models import ModelConfig

    expected = {"meta-llama/Llama-2-7b-hf": 6.74e9, "Qwen/Qwen2-7B": 7.62e9, "google/gemma-2-9b": 9.24e9}
    for name, parameters in expected.items():
        size = model_size(ModelConfig(name=name))
        assert size is not None and size.parameters == pytest.approx(parameters, rel=0.005), name
    assert model_size(ModelConfig(name="meta-llama/Llama-2-7b-hf")).lora_parameters == 25_165_824
    assert model_size(ModelConfig(name="someone/unknown-model")) is None


def test_evaluation_and_judging_are_counted_and_the_h200_generates_faster():
    """The paper's Llama-2 SST-2 grid: 9 evaluations of 1,000 harmful prompts (512 new tokens) and
    1,000 SST-2 sentences (the task's own limit), judged by the 7B beaver-dam, at batch 32."""
    sweep = load_sweep("configs/paper/llama2-7b-sst2.yaml")
    size = cost.model_size(sweep.base.model)
    plan = estimate(sweep, "/nonexistent")
    assert sum(len(e.evaluations) for e in plan) == 9
    ev = evaluation_size(sweep.base)
    assert ev.answers == (
        (1000, 512),
        (1000, 8),
    )  # a label: 8 tokens and ev.batch == 32 and ev.weight_bytes == 2
    assert ev.judged == 1000 and ev.judge_parameters > 6e9
    # on the H100, step by step: prompts and judge at 35% of 989 TFLOP/s; each decoding step reads
    # the weights and the batch's KV cache at 50% of 3.35 TB/s
    compute = 989e12 * 0.35
    kv = 2 * 32 * 4096 * 2  # bytes per token: keys and values of 32 layers of width 4096, bf16
    seconds = 0.0
    for n, new in ev.answers:
        step = (size.parameters * 2 + 32 * (256 + new / 2) * kv) / (3.35e12 * 0.5)
        seconds += 2 * size.parameters * n * 256 / compute + (n // 32 + (n % 32 > 0)) * new * step
    seconds += 2 * ev.judge_parameters * 1000 * 512 / compute  # 256 + 512 tokens, cut at 512
    a100, h100, h200 = cost.evaluation_hours(size, ev)
    assert h100 == pytest.approx(seconds / 3600)
    assert h200 < h100 < a100  # decoding waits on memory: 4.8 and 2.04 TB/s against 3.35
    keyword = evaluation_size(
        load_sweep("configs/paper/llama2-7b-sst2.yaml", ["evaluate.judge=keyword"]).base
    )
    judge = cost.evaluation_hours(size, ev)[1] - cost.evaluation_hours(size, keyword)[1]
    assert judge == pytest.approx(2 * ev.judge_parameters * 1000 * 512 / compute / 3600)
    lines = cost_lines(sweep, plan, size)
    for row in lines[2:7]:  # each cell's H100 and H200 hours differ: their evaluations do
        assert row.split()[-2] != row.split()[-1]
    grid = lines[-2]
    total = [9 * h for h in (a100, h100, h200)]
    found = re.findall(r"(A100 80GB|H100 80GB|H200 141GB) ([\d.]+) \+ ([\d.]+) = ([\d.]+)", grid)
    assert [name for name, *_ in found] == ["A100 80GB", "H100 80GB", "H200 141GB"]
    assert [float(e) for _, _, e, _ in found] == [float(f"{h:.3g}") for h in total]
    assert found[1][1] == found[2][1]  # the same training time on the H100 and the H200
    assert all(float(b) == pytest.approx(float(t) + float(e), abs=0.01) for _, t, e, b in found)
    assert "beaver-dam judge" in lines[-1] and "evaluation not counted" not in lines[-1]
