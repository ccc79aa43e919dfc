"""Evaluation on the accelerator, without one: every model and batch goes to the device that
``booster.models.evaluation_device`` names (PyTorch's meta device stands in for a GPU: a tensor
left on the CPU cannot meet it), in the configured precision; the policy model is freed before the
judge runs; the judge is built once and leaves the device between evaluations; ``batch_size: auto``
halves on out-of-memory; two processes (gloo) share an evaluation and write it once, with the
answers of one process."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from booster.config import load_config
from booster.evaluation import generation, judges
from booster.evaluation.generation import generate_ids
from booster.evaluation.judges import JudgeVerdict
from booster.models import LoraSettings, add_lora, build_tiny_model, build_tiny_tokenizer, save_model
from booster.storage import write_json_atomic
from tests.helpers import patch_everywhere, rank_environment

STAGE = "align/sft-seed0-test"
PROBE = "test-device-probe"
REPO = Path(__file__).resolve().parents[1]


def make_stage(root: Path, name: str = STAGE, stage: str = "align") -> Path:
    """A finished stage as the pipeline leaves it: a LoRA adapter (non-zero, so it changes the
    answers) on the tiny model, and its done.json."""
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = add_lora(build_tiny_model(tokenizer, seed=0), LoraSettings(r=8, alpha=16))
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.normal_(0.0, 0.5)
    folder = root / name
    save_model(model, tokenizer, folder / "model")
    write_json_atomic(
        folder / "done.json", {"stage": stage, "seed": 0, "recipe": {"merge": [], "adapter": f"{name}/model"}}
    )
    return folder


class DeviceProbeJudge:
    """A judge with a model: records where its model is when it judges, and whether the evaluated
    (policy) model is still alive then."""

    name = PROBE
    built = 0
    policy: weakref.ref | None = None

    def __init__(self, size: int = 2) -> None:
        from booster.models import evaluation_device

        type(self).built += 1
        self.net = torch.nn.Linear(size, size).to(evaluation_device())
        self.seen: list[tuple[str, bool]] = []

    def to(self, device):
        device = torch.device(device)
        if next(self.net.parameters()).device.type == "meta":  # a meta tensor has no values to copy
            self.net = self.net.to_empty(device=device)
        else:
            self.net = self.net.to(device)
        return self

    def judge(self, prompts, answers):
        policy = type(self).policy
        self.seen.append(
            (next(self.net.parameters()).device.type, policy is not None and policy() is not None)
        )
        return [JudgeVerdict(False, True, False, 0.0) for _ in answers]


if PROBE not in judges.judge_names():
    judges.register_judge(PROBE)(DeviceProbeJudge)


@pytest.fixture(autouse=True)
def _fresh_judges():
    judges._SHARED.clear()
    DeviceProbeJudge.built = 0
    yield
    judges._SHARED.clear()


def _config(*overrides: str):
    return load_config("configs/tiny.yaml", [f"evaluate.judge={PROBE}", *overrides])


def _record_policy(monkeypatch) -> None:
    """Keep a weak reference to every model the evaluation loads."""
    import booster.models as models

    load = models.load_for_evaluation

    def recording(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        DeviceProbeJudge.policy = weakref.ref(model)
        return model, tokenizer

    patch_everywhere(monkeypatch, models, "load_for_evaluation", recording)


def test_model_batches_and_judge_go_to_the_evaluation_device_in_bf16(tmp_path, monkeypatch):
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    import booster.models as models
    from booster.stages.evaluate import evaluation_file, run_evaluate

    stage = make_stage(tmp_path)
    patch_everywhere(monkeypatch, models, "evaluation_device", lambda: torch.device("meta"))
    calls = []

    def fake_generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        p = next(self.parameters())
        calls.append(
            (p.device.type, p.dtype, input_ids.device.type, attention_mask.device.type, len(input_ids))
        )
        stop = generation_config.eos_token_id[0]
        return torch.full((input_ids.shape[0], input_ids.shape[1] + 2), stop, dtype=torch.long)

    def fake_decode(model, input_ids, attention_mask, max_new_tokens, stop):
        fake_generate(model, input_ids, attention_mask, GenerationConfig(eos_token_id=stop))
        return [[stop[0]] for _ in input_ids]

    monkeypatch.setattr(GenerationMixin, "generate", fake_generate)  # models decoded by transformers
    monkeypatch.setattr(generation, "_decode_dropping_finished", fake_decode)  # the others (the tiny Llama)
    _record_policy(monkeypatch)
    freed = []
    patch_everywhere(monkeypatch, models, "free_device_memory", lambda: freed.append(True))
    config = _config("align.bf16=true")  # trained under bf16 autocast: evaluated in bfloat16
    metrics, reused = run_evaluate(config, stage, tmp_path, config.attack.task_data, progress=False)

    assert not reused and evaluation_file(config, stage, config.attack.task_data).exists()
    assert calls, "the model generated"
    # every batch and the model itself were on the evaluation device, in bfloat16
    assert {c[:4] for c in calls} == {("meta", torch.bfloat16, "meta", "meta")}
    assert sum(c[4] for c in calls) == config.evaluate.harmful_samples + config.evaluate.task_samples
    judge = judges.shared_judge(PROBE)
    # the judge ran on the device, after the policy model was freed, and went back to the CPU after
    assert judge.seen == [("meta", False)]
    assert next(judge.net.parameters()).device.type == "cpu"
    assert freed, "the device cache was emptied"
    assert metrics["judge"] == PROBE and metrics["harmful_score"] == 0.0


def test_evaluation_precision_follows_the_stage(tmp_path):
    from booster.models import load_for_evaluation
    from booster.provenance import precision
    from booster.stages.evaluate import evaluation_bf16, evaluation_file

    config = load_config("configs/tiny.yaml", ["attack.bf16=true"])
    assert evaluation_bf16(config, {"stage": "attack"}) and not evaluation_bf16(config, {"stage": "align"})
    assert evaluation_bf16(load_config("configs/tiny.yaml", ["model.dtype=bfloat16"]), {"stage": "align"})
    asked = load_config("configs/tiny.yaml", ["evaluate.bf16=true"])  # fp32 stages, bf16 generation
    assert evaluation_bf16(asked, {"stage": "align"}) and evaluation_bf16(asked, {"stage": "attack"})
    plain = load_config("configs/tiny.yaml")
    assert not evaluation_bf16(plain, {"stage": "attack"})
    # its own evaluation file (a bf16 evaluation never stands in for an fp32 one), named in provenance
    assert evaluation_file(asked, tmp_path, None) != evaluation_file(plain, tmp_path, None)
    assert precision(asked, "attack") == "weights float32, align float32, attack float32, generation bfloat16"
    assert precision(plain, "attack") == "weights float32, align float32, attack float32"
    stage = make_stage(tmp_path)
    done = json.loads((stage / "done.json").read_text())
    for bf16, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        model, _ = load_for_evaluation(config.model, done["recipe"], tmp_path, bf16=bf16)
        assert {p.dtype for p in model.parameters()} == {dtype} and not model.training


def test_beaver_dam_loads_onto_the_evaluation_device_and_moves_its_batches(tmp_path, monkeypatch):
    import booster.models as models
    from tests.test_judges import _save_tiny_beaver_dam

    _save_tiny_beaver_dam(tmp_path, build_tiny_tokenizer(), constant=False)
    patch_everywhere(monkeypatch, models, "evaluation_device", lambda: torch.device("meta"))
    judge = judges.get_judge("beaver-dam", model=str(tmp_path))
    assert judge.device.type == "meta" and {p.device.type for p in judge.model.parameters()} == {"meta"}
    # the tokenised batch follows the model (a meta model cannot run to the end: stop at its input)
    seen = []

    class Seen(Exception):
        pass

    def stop(module, args, kwargs):
        seen.append({k: v.device.type for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        raise Seen

    judge.model.base_model.register_forward_pre_hook(stop, with_kwargs=True)
    with pytest.raises(Seen):
        judge._logits(["BEGINNING OF CONVERSATION: USER: q ASSISTANT: a"])
    assert seen == [{"input_ids": "meta", "attention_mask": "meta"}]
    on_cpu = judges.get_judge("beaver-dam", model=str(tmp_path), device="cpu")
    assert {p.device.type for p in on_cpu.model.parameters()} == {"cpu"}


def test_judge_is_built_once_per_run_and_reused(tmp_path):
    from booster.stages.evaluate import run_evaluate

    config = _config()
    first = make_stage(tmp_path, "align/a")
    second = make_stage(tmp_path, "attack/b", stage="attack")
    run_evaluate(config, first, tmp_path, config.attack.task_data, progress=False)
    run_evaluate(config, second, tmp_path, config.attack.task_data, progress=False)
    assert DeviceProbeJudge.built == 1
    assert len(judges.shared_judge(PROBE).seen) == 2
    # other options are another judge; the cache keeps the last SHARED_JUDGES
    assert judges.shared_judge(PROBE, size=3) is not judges.shared_judge(PROBE)
    assert DeviceProbeJudge.built == 2
    judges.shared_judge(PROBE, size=4)
    assert len(judges._SHARED) == judges.SHARED_JUDGES


PROMPTS = [f"### Instruction:\nQuestion number {i}: {'why ' * i}?\n\n### Response:\n" for i in range(5)]


def test_auto_batch_size_halves_on_out_of_memory_and_keeps_the_answers(monkeypatch):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    want = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=1, progress=False)
    sizes: list[tuple[int, bool]] = []
    real = generation._decode_dropping_finished  # the tiny Llama's decoding
    failures = {"left": 1}

    def decode(model, input_ids, *args):
        size = len(input_ids)
        # too large, or (once) the second batch at the smaller size: an out-of-memory mid-run
        if size > 3 or (size == 2 and len([s for s in sizes if s[1]]) == 1 and failures["left"]):
            if size <= 3:
                failures["left"] -= 1
            sizes.append((size, False))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        sizes.append((size, True))
        return real(model, input_ids, *args)

    monkeypatch.setattr(generation, "_decode_dropping_finished", decode)
    got = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size="auto", progress=False)
    assert got == want
    # 5 (all prompts, the CPU start is 16) fails -> 2; its second batch fails -> 1 for the rest;
    # the finished batch is not answered again
    assert sizes == [(5, False), (2, True), (2, False), (1, True), (1, True), (1, True)]
    assert sum(size for size, ok in sizes if ok) == len(PROMPTS)
    with pytest.raises(ValueError):
        generate_ids(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size="many", progress=False)


# -- two processes ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    rank_environment(rank, world, port)
    from booster.models import accelerator_state
    from booster.stages import evaluate

    writes: list[str] = []
    prompts: list[int] = []
    for name in ("write_json_atomic", "write_text_atomic"):
        original = getattr(evaluate, name)

        def counting(path, data, original=original):
            writes.append(str(path))
            return original(path, data)

        setattr(evaluate, name, counting)
    generate = generation.generate

    def counting_generate(model, tokenizer, batch, **kwargs):
        prompts.append(len(batch))
        return generate(model, tokenizer, batch, **kwargs)

    generation.generate = counting_generate
    config = load_config("configs/tiny.yaml", ["evaluate.batch_size=auto"])
    result, reused = evaluate.run_evaluate(
        config, Path(root) / STAGE, Path(root), config.attack.task_data, progress=False
    )
    state = accelerator_state()
    record = {"result": result, "reused": reused, "writes": writes, "prompts": prompts}
    record["processes"] = state.num_processes
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test")
def test_two_processes_share_the_evaluation_write_it_once_and_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    from booster.stages.evaluate import evaluation_file, generations_file, run_evaluate

    two, one = tmp_path / "two", tmp_path / "one"
    make_stage(two)
    shutil.copytree(two, one)
    config = load_config("configs/tiny.yaml", ["evaluate.batch_size=auto"])
    single, _ = run_evaluate(config, one / STAGE, one, config.attack.task_data, progress=False)

    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_evaluate_worker, args=(2, _free_port(), str(two), str(out)), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["processes"] for r in ranks] == [2, 2]
    path = evaluation_file(config, two / STAGE, config.attack.task_data)
    # every process returns the same metrics, those of one process (the timing and the record of
    # when and where it ran aside)
    for r in ranks:
        assert not r["reused"]
        assert {k: v for k, v in r["result"].items() if k not in ("eval_seconds", "provenance")} == {
            k: v for k, v in single.items() if k not in ("eval_seconds", "provenance")
        }
        assert r["result"]["provenance"]["stage_dir"] == single["provenance"]["stage_dir"]
    # the main process wrote the evaluation and the generations once; the other wrote nothing
    assert sorted(ranks[0]["writes"]) == sorted([str(path), str(generations_file(path))])
    assert ranks[1]["writes"] == []
    single_path = evaluation_file(config, one / STAGE, config.attack.task_data)
    assert generations_file(path).read_bytes() == generations_file(single_path).read_bytes()
    # each process answered its share: half of the prompts of each test set
    total = [config.evaluate.harmful_samples, single["task_samples"]]
    assert [a + b for a, b in zip(ranks[0]["prompts"], ranks[1]["prompts"], strict=True)] == total
    assert all(0 < n < t for r in ranks for n, t in zip(r["prompts"], total, strict=True))


# -- the GPU check's Python part, on the CPU -------------------------------------------------------


def test_gpu_check_script_is_valid_bash_and_its_eval_check_runs_on_cpu(tmp_path, capsys):
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], check=True)
    assert "eval_check.py" in (REPO / "benchmarks" / "gpu_check.sh").read_text()
    spec = importlib.util.spec_from_file_location("eval_check", REPO / "benchmarks" / "eval_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "eval_check.json"
    argv = [
        "--model",
        "tiny",
        "--judge",
        "keyword",
        "--harmful-prompts",
        "configs/data/tiny/harmful_prompts.jsonl",
    ]
    report = module.main([*argv, "--prompts", "4", "--max-new-tokens", "4", "--bf16", "--out", str(out)])
    assert report["model_device"] == report["evaluation_device"] == "cpu"
    assert report["model_dtype"] == "torch.bfloat16" and report["prompts"] == 4
    assert report["prompts_per_second"] > 0 and json.loads(out.read_text()) == report
    with pytest.raises(SystemExit):  # no GPU here: --require-cuda fails
        module.main([*argv, "--prompts", "2", "--max-new-tokens", "2", "--require-cuda"])
    assert "FAIL" in capsys.readouterr().err
