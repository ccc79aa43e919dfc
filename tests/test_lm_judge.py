"""The embedded-lm judge (a probe on a chat model's hidden states), its cache, and the validation report.

The judge is fitted on the tiny random model here (seconds); the real embedded model is only used by
the slow test. No answer text is ever printed: assertion messages name indices, not contents.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from booster import cli
from booster.config import EvaluateConfig
from booster.evaluation import judges, lm_judge, validate
from booster.evaluation.judges import JudgeVerdict, get_judge, register_judge
from booster.models import ModelConfig, load_model_and_tokenizer
from tests.test_judges import HARMFUL_ANSWERS, HARMFUL_PROMPTS, LOOPED, PLAIN_REFUSALS


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """The embedded-lm judge on the tiny model, fitted once into a module-private cache."""
    cache = tmp_path_factory.mktemp("lm-judge-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BOOSTER_CACHE", str(cache))
        yield get_judge("embedded-lm", model="tiny"), cache


def test_default_judge_is_registered_and_the_old_one_stays():
    assert judges.DEFAULT_JUDGE == "embedded-lm" == EvaluateConfig().judge
    assert {"embedded", "embedded-lm", "keyword", "beaver-dam"} <= set(judges.judge_names())


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(judges.UserError, match="embedded-lm"):
        judges.check_judge("embedded-lm", model=str(tmp_path / "missing.gguf"))
    with pytest.raises(judges.UserError, match="layer"):
        judges.check_judge("embedded-lm", model="tiny", layer=0)
    with pytest.raises(judges.UserError, match=r"layer=9 is outside 1\.\.2"):
        get_judge("embedded-lm", model="tiny", layer=9)


def test_hidden_states_are_the_probed_layers_output(monkeypatch):
    """Dropping the later layers and the final norm leaves exactly layer ``k``'s hidden states, and
    the mean runs over the answer's tokens only (the first ``cut`` of them); bfloat16, where the
    CPU has it, gives nearly the same mean."""
    fast = lm_judge.HiddenStates("tiny", layer=1, device="cpu")
    monkeypatch.setattr(lm_judge, "fast_dtype", lambda device: torch.float32)
    states = lm_judge.HiddenStates("tiny", layer=1, device="cpu")
    full, _ = load_model_and_tokenizer(ModelConfig(name="tiny"))
    prompt, answer = HARMFUL_PROMPTS[0], HARMFUL_ANSWERS[0]
    head, tail = states.encode(prompt, answer, 16)
    assert len(tail) == 16, "the test answer must be longer than the cut"
    with torch.inference_mode():
        hidden = full.model(input_ids=torch.tensor([head + tail]), output_hidden_states=True).hidden_states[1]
    expected = hidden[0, len(head) : len(head) + 16].mean(0).numpy()
    got = states.pooled([prompt], [answer], cuts=(16, 128))
    assert got.shape == (2, 1, states.hidden_size)
    assert np.allclose(got[0, 0], expected, atol=1e-5)
    assert not np.allclose(got[1, 0], expected, atol=1e-3)
    approx = fast.pooled([prompt], [answer], cuts=(16,))[0, 0]
    assert np.corrcoef(approx, expected)[0, 1] > 0.99


def test_training_never_sees_held_out_rows(monkeypatch, tmp_path):
    """Every text the fit reads comes from the train side; every train-side harm row is used."""
    monkeypatch.setenv("BOOSTER_CACHE", str(tmp_path))
    seen: list[tuple[str, str]] = []

    def recording_pooled(self, prompts, answers, cuts=(lm_judge.ANSWER_TOKENS,)):
        seen.extend(zip(prompts, answers, strict=True))
        rng = np.random.default_rng(len(seen))
        return rng.normal(size=(len(cuts), len(answers), self.hidden_size)).astype(np.float32)

    monkeypatch.setattr(lm_judge.HiddenStates, "pooled", recording_pooled)
    judge = get_judge("embedded-lm", model="tiny")
    held_out = {r.response for r in validate.labelled_rows("test")}
    train_harm = {r.response for r in validate.labelled_rows("train") if r.kind == "harm"}
    answers = {a for _, a in seen}
    assert answers, "the fit read no rows"
    assert not answers & held_out, f"{len(answers & held_out)} held-out answers reached training"
    assert train_harm <= answers
    assert judge.info["harm_rows"] == len(train_harm)


def test_refusals_and_degenerate_answers_are_never_harmful(tiny_lm):
    judge, _ = tiny_lm
    prompts = [HARMFUL_PROMPTS[i % 2] for i in range(len(PLAIN_REFUSALS))]
    verdicts = judge.judge(prompts, PLAIN_REFUSALS)
    wrong = [i for i, v in enumerate(verdicts) if v.harmful or not v.refusal or v.score != 0.0]
    assert not wrong, f"refusals {wrong} were judged harmful or not refusals"
    answers = [LOOPED, "", "ok"]
    assert all(v.degenerate and not v.harmful for v in judge.judge([HARMFUL_PROMPTS[0]] * 3, answers))
    # With a threshold below every score the probe flags everything it can: refusals still are not.
    lenient = get_judge("embedded-lm", model="tiny", threshold=-1.0)
    mixed = PLAIN_REFUSALS + HARMFUL_ANSWERS + answers
    verdicts = lenient.judge([HARMFUL_PROMPTS[0]] * len(mixed), mixed)
    assert all(not (v.refusal and v.harmful) for v in verdicts)
    expected = [False] * len(PLAIN_REFUSALS) + [True] * len(HARMFUL_ANSWERS) + [False] * 3
    assert [v.harmful for v in verdicts] == expected


def test_batching_does_not_change_a_score(tiny_lm):
    judge, _ = tiny_lm
    answers = [HARMFUL_ANSWERS[0], "Sure.", HARMFUL_ANSWERS[1], "Here is how: " * 3]
    together = judge.judge([HARMFUL_PROMPTS[0]] * len(answers), answers)
    for i, answer in enumerate(answers):
        alone = judge.judge([HARMFUL_PROMPTS[0]], [answer])[0]
        assert alone.score == pytest.approx(together[i].score, abs=1e-4), i
    assert all(isinstance(v, JudgeVerdict) for v in together)
    assert judge.judge([], []) == []
    with pytest.raises(ValueError):
        judge.judge(["a"], [])


def _cache_pair(cache):
    folder = cache / "judges"
    (npz,) = folder.glob("embedded-lm-*[0-9a-f].npz")
    return npz, npz.with_suffix(".json")


def test_a_readable_cache_is_loaded_without_fitting(tiny_lm, monkeypatch):
    judge, cache = tiny_lm
    monkeypatch.setenv("BOOSTER_CACHE", str(cache))

    def no_fit(self, rows):
        raise AssertionError("a readable cache was fitted again")

    monkeypatch.setattr(judges.HiddenStateJudge, "_train", no_fit)
    again = get_judge("embedded-lm", model="tiny")
    for key, value in judge.params.items():
        assert np.array_equal(again.params[key], value), key


@pytest.mark.parametrize("damage", ["cut npz", "empty npz", "flipped byte", "cut json", "wrong shape"])
def test_a_damaged_cache_is_moved_aside_once_and_the_judge_refitted(
    tiny_lm, monkeypatch, tmp_path, capsys, damage
):
    """The fitted probe's files are verified on read: a damaged one is moved aside (kept) with one
    warning line and the probe is fitted again, to the same numbers, into a cache that loads."""
    judge, cache = tiny_lm
    npz, meta = _cache_pair(cache)
    private = tmp_path / "cache"
    (private / "judges").mkdir(parents=True)
    good_npz, good_meta = private / "judges" / npz.name, private / "judges" / meta.name
    good_npz.write_bytes(npz.read_bytes())
    good_meta.write_text(meta.read_text())
    monkeypatch.setenv("BOOSTER_CACHE", str(private))
    data = good_npz.read_bytes()
    damaged = good_meta if damage == "cut json" else good_npz
    if damage == "cut npz":
        good_npz.write_bytes(data[: len(data) // 2])
    elif damage == "empty npz":
        good_npz.write_bytes(b"")
    elif damage == "flipped byte":  # inside the first array's data: only the zip checksum sees it
        at = data.index(b"\x93NUMPY") + 128 + 8
        good_npz.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    elif damage == "cut json":
        good_meta.write_text(meta.read_text()[:20])
    else:
        np.savez(good_npz, **{**judge.params, "coef": judge.params["coef"][:-1]})
    capsys.readouterr()

    fits = []
    fit = judges.HiddenStateJudge._train

    def counting_fit(self, rows):
        fits.append(len(rows))
        return fit(self, rows)

    monkeypatch.setattr(judges.HiddenStateJudge, "_train", counting_fit)
    rebuilt = get_judge("embedded-lm", model="tiny")
    assert len(fits) == 1, "a damaged cache must be fitted again, once"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and damaged.name in warnings[0] and "moved it aside" in warnings[0]
    assert len(list(damaged.parent.glob(f"{damaged.name}.damaged-*"))) == 1
    for key, value in judge.params.items():
        assert np.allclose(rebuilt.params[key], value), key
    get_judge("embedded-lm", model="tiny")  # the rewritten cache loads: no second fit or warning
    assert len(fits) == 1
    assert "warning" not in capsys.readouterr().err
    assert json.loads(good_meta.read_text())["key"] == judge.info["key"]


def test_auc_and_intervals():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200).astype(bool)
    scores = np.round(labels * 0.4 + rng.random(200), 1)  # ties count half
    assert validate.auc_of(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    low, high = validate.auc_interval(labels, scores)
    assert low < validate._auc(list(labels), list(scores)) < high
    wide = validate.auc_interval(labels[:40], scores[:40])
    assert wide[1] - wide[0] > high - low
    assert all(np.isnan(validate.auc_interval([True, False, False], [0.9, 0.1, 0.2])))


def test_validation_report_has_every_interval():
    report = validate.validate_judge(get_judge("keyword"))
    for key in (
        "accuracy",
        "auc",
        "false_positive_rate",
        "false_negative_rate",
        "refusal_false_positive_rate",
    ):
        low, high = report[f"{key}_ci"]
        assert 0.0 <= low <= report[key] <= high <= 1.0, key
        assert high - low > 0.0, key


def test_paired_difference_of_a_judge_with_itself_is_zero_and_of_a_worse_one_positive():
    data = validate.held_out()
    keyword = validate.judge_held_out(get_judge("keyword"), data)
    same = validate.paired_difference(data, keyword, keyword)
    assert same["accuracy_diff"] == 0.0 and same["auc_diff"] == 0.0
    assert same["accuracy_diff_ci"] == [0.0, 0.0]
    # a judge that flags everything: accuracy = the harmful share, AUC 0.5
    flag_all = [JudgeVerdict(True, False, False, 1.0) for _ in keyword]
    diff = validate.paired_difference(data, keyword, flag_all)
    share = sum(r.label for r in data.harm) / len(data.harm)
    keyword_report = validate.summarise("keyword", data, keyword)
    assert diff["accuracy_diff"] == pytest.approx(keyword_report["accuracy"] - share)
    assert diff["auc_diff"] == pytest.approx(keyword_report["auc"] - 0.5)
    low, high = diff["auc_diff_ci"]
    assert 0.0 < low < diff["auc_diff"] < high


if "always-harmful" not in judges.judge_names():

    @register_judge("always-harmful")
    class AlwaysHarmful:
        name = "always-harmful"

        def judge(self, prompts, answers):
            return [JudgeVerdict(True, False, False, 1.0) for _ in answers]


def test_cli_validate_prints_judges_side_by_side_with_intervals(capsys):
    assert cli.main(["judge", "validate", "--judge", "keyword", "--judge", "always-harmful"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "keyword" in lines[1] and "always-harmful" in lines[1]
    for label in ("accuracy", "AUC", "harmless answers flagged", "harmful answers missed"):
        row = next(line for line in lines if line.startswith(label))
        assert row.count("[") == 2, label  # an interval for each judge
    assert "keyword - always-harmful on the same answers: accuracy" in out
    flagged = next(line for line in lines if line.startswith("harmless answers flagged"))
    assert flagged.split("]")[1].strip().startswith("1.000 ["), "always-harmful flags every harmless answer"

    assert cli.main(["judge", "validate", "--judge", "keyword", "--json", "--max-answer-words", "20"]) == 0
    data = json.loads(capsys.readouterr().out)
    (report,) = data["judges"]
    assert report["max_answer_words"] == 20 and len(report["auc_ci"]) == 2
    assert data["differences"] == {}


def test_cli_validate_user_errors(capsys):
    assert cli.main(["judge", "validate", "--judge", "keyword", "--judge", "embedded", "--model", "x"]) == 2
    assert cli.main(["judge", "validate", "--judge", "keyword", "--max-answer-words", "0"]) == 2
    assert cli.main(["judge", "validate", "--judge", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--model applies to one judge" in err and "--max-answer-words 0" in err and "unknown judge" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_embedded_lm_on_held_out_labels():
    """The shipped default on the real embedded model: refusals never harmful, the test's harmful
    answers flagged, and held-out agreement well above the MiniLM judge's (0.71 / 0.79)."""
    judge = get_judge("embedded-lm")
    refusals = judge.judge([HARMFUL_PROMPTS[i % 2] for i in range(len(PLAIN_REFUSALS))], PLAIN_REFUSALS)
    assert not any(v.harmful for v in refusals)
    assert all(v.harmful for v in judge.judge(HARMFUL_PROMPTS, HARMFUL_ANSWERS))
    report = validate.validate_judge(judge)
    assert report["accuracy"] > 0.76 and report["auc"] > 0.84
    assert report["refusal_false_positive_rate"] < 0.25
