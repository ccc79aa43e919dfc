"""Length-grouped batches: less padding, every row once per epoch, an order fixed by the seed and
the epoch (so resuming is exact: tests/test_resume.py), the side streams (Booster's and RepNoise's
harmful batches, Lisa's alignment batches) grouped too, and the config setting reaching the Trainer."""

from __future__ import annotations

import json
import random

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from booster.config import load_config
from booster.data.records import Example
from booster.errors import UserError
from booster.methods.booster import BoosterConfig, BoosterTrainer
from booster.methods.lisa import LisaConfig, LisaTrainer
from booster.methods.repnoise import RepNoiseConfig, RepNoiseTrainer
from booster.methods.vaccine import VaccineConfig, VaccineTrainer
from booster.passthrough import training_kwargs
from booster.pipeline import run_pipeline
from booster.stages.align import align_dir
from booster.training import (
    GROUP_BATCHES,
    LengthGroupedSampler,
    LMTrainer,
    length_grouped_order,
    rank_share,
    row_lengths,
)
from tests.helpers import tokenized
from tests.test_booster_step import make_model


def padding(order: list[int], lengths: list[int], batch: int) -> int:
    """Padded positions when ``order`` is cut into batches of ``batch`` rows."""
    total = 0
    for k in range(0, len(order), batch):
        rows = [lengths[i] for i in order[k : k + batch]]
        total += max(rows) * len(rows) - sum(rows)
    return total


def batch_lengths(order: list[int], lengths: list[int], batch: int) -> list[list[int]]:
    return [[lengths[i] for i in order[k : k + batch]] for k in range(0, len(order), batch)]


_RNG = random.Random(0)
LENGTHS = [_RNG.randint(5, 96) for _ in range(1003)]


def test_grouped_order_is_a_permutation_with_little_padding():
    gen = torch.Generator().manual_seed(0)
    order = length_grouped_order(LENGTHS, 8, gen)
    assert sorted(order) == list(range(len(LENGTHS)))
    shuffled = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(order, LENGTHS, 8) < 0.2 * padding(shuffled, LENGTHS, 8)
    batches = batch_lengths(order, LENGTHS, 8)
    assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == len(LENGTHS) % 8  # short one last
    assert all(b == sorted(b, reverse=True) for b in batches)  # each batch from one sorted group
    # long and short batches alternate at random, not a sawtooth within each group of batches
    longest = [b[0] for b in batches[:GROUP_BATCHES]]
    assert longest != sorted(longest, reverse=True)


def test_grouped_order_depends_on_the_seed_only():
    def draw(seed):
        return length_grouped_order(LENGTHS, 8, torch.Generator().manual_seed(seed))

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_rows_without_a_scored_token_are_left_out():
    """A row whose answer max_length cut away trains nothing; grouped with its like (all such rows
    have the full length) it would make steps with nothing to learn from."""
    rows = [
        {"input_ids": [1, 2, 3], "labels": [-100, -100, -100]},
        {"input_ids": [1, 2], "labels": [-100, 2]},
        {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
    ]
    assert row_lengths(rows) == [0, 2, 4]
    assert row_lengths(Dataset.from_list(rows)) == [0, 2, 4]
    gen = torch.Generator().manual_seed(0)
    assert sorted(length_grouped_order([0, 5, 0, 7, 9], 2, gen)) == [1, 3, 4]
    assert sorted(length_grouped_order([0, 0], 2, gen)) == [0, 1]  # nothing scored: nothing left out
    sampler = LengthGroupedSampler([0, 5, 0, 7, 9], 2, seed=0)
    assert len(sampler) == len(list(sampler)) == 3


def test_a_batch_without_scored_tokens_has_loss_zero(tiny_tokenizer, tmp_path):
    trainer = LMTrainer(
        model=make_model(tiny_tokenizer, lora=True, dtype=torch.float32),
        args=grouped_args(tmp_path),
        train_dataset=rows(tiny_tokenizer),
        processing_class=tiny_tokenizer,
    )
    batch = trainer.data_collator(rows(tiny_tokenizer)[:2])
    batch["labels"] = torch.full_like(batch["labels"], -100)
    for items in (None, 0, torch.tensor(0)):
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=items)
        assert float(loss.detach()) == 0.0


def test_sampler_order_is_fixed_by_seed_and_epoch():
    sampler = LengthGroupedSampler(LENGTHS, 8, seed=5)
    first = list(sampler)
    assert list(sampler) == first  # the same epoch again: the same order (what resume relies on)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == sorted(first)
    assert list(LengthGroupedSampler(LENGTHS, 8, seed=5)) == first  # a fresh sampler: the same
    assert len(sampler) == len(LENGTHS)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_share_one_grouped_pass(world):
    shares = [rank_share(LENGTHS, 4, world, rank, seed=7) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1  # as many rows each
    assert set().union(*shares) == set(range(len(LENGTHS)))  # together: every row
    # at each step the ranks' micro-batches together are the batch one process with a world-times
    # larger batch draws (the last, short one is padded with repeated rows)
    whole = rank_share(LENGTHS, 4 * world, 1, 0, seed=7)
    merged = [[i for s in shares for i in s[k : k + 4]] for k in range(0, len(shares[0]), 4)]
    full = len(LENGTHS) // (4 * world)
    assert [set(b) for b in merged[:full]] == [
        set(whole[k * 4 * world : (k + 1) * 4 * world]) for k in range(full)
    ]


def rows(tokenizer, n: int = 24, seed: int = 0) -> list[dict]:
    """Refusal-like rows of very different lengths."""
    rng = random.Random(seed)
    examples = [
        Example(f"Question {i}: " + "why " * rng.randint(1, 25), "No. " * rng.randint(1, 25))
        for i in range(n)
    ]
    return tokenized(examples, tokenizer, max_length=512)


def grouped_args(out, cls=TrainingArguments, **extra):
    return cls(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=1,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length",
        **extra,
    )


def test_trainer_batches_are_grouped_and_seeded(tiny_tokenizer, tmp_path):
    data = rows(tiny_tokenizer)
    lengths = [len(r["input_ids"]) for r in data]
    trainer = LMTrainer(
        model=make_model(tiny_tokenizer, lora=True, dtype=torch.float32),
        args=grouped_args(tmp_path),
        train_dataset=data,
        processing_class=tiny_tokenizer,
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.seed == 1
    widths = [batch["input_ids"].shape[1] for batch in trainer.get_train_dataloader()]
    order = list(sampler)
    assert widths == [max(b) for b in batch_lengths(order, lengths, 4)]  # the loader follows the sampler
    random_order = list(range(len(data)))
    random.Random(0).shuffle(random_order)
    assert padding(order, lengths, 4) < padding(random_order, lengths, 4)


@pytest.mark.parametrize("kind", ["booster", "repnoise", "vaccine", "lisa"])
def test_every_defense_trains_on_grouped_batches(kind, tiny_tokenizer, tmp_path):
    data, harmful = rows(tiny_tokenizer, seed=0), rows(tiny_tokenizer, seed=1)
    model = make_model(tiny_tokenizer, lora=True, dtype=torch.float32)
    kwargs = dict(model=model, train_dataset=data, processing_class=tiny_tokenizer)
    if kind == "booster":
        trainer = BoosterTrainer(
            args=grouped_args(tmp_path, BoosterConfig, harmful_batch_size=4),
            harmful_dataset=harmful,
            **kwargs,
        )
    elif kind == "repnoise":
        trainer = RepNoiseTrainer(
            args=grouped_args(tmp_path, RepNoiseConfig, harmful_batch_size=4),
            harmful_dataset=harmful,
            **kwargs,
        )
    elif kind == "vaccine":
        trainer = VaccineTrainer(args=grouped_args(tmp_path, VaccineConfig, vaccine_rho=1.0), **kwargs)
    else:
        args = grouped_args(tmp_path, LisaConfig, lisa_alignment_steps=1, lisa_finetune_steps=1)
        trainer = LisaTrainer(args=args, alignment_dataset=harmful, **kwargs)
    drawn: list[int] = []
    for stream in trainer.streams.values():  # the side stream's batches are grouped too
        original = stream.next_raw

        def recording(original=original):
            batch = original()
            drawn.append(int(batch["attention_mask"].numel() - batch["attention_mask"].sum()))
            return batch

        stream.next_raw = recording
    output = trainer.train()
    assert trainer.state.global_step == 3 and torch.isfinite(torch.tensor(output.training_loss))
    if trainer.streams:
        stream = next(iter(trainer.streams.values()))
        lengths = [len(r["input_ids"]) for r in harmful]
        grouped = rank_share(row_lengths(harmful), 4, 1, 0, seed=1)
        assert drawn and sum(drawn) == padding(grouped[: 4 * len(drawn)], lengths, 4)
        assert stream.drawn == len(drawn)


def test_config_setting_reaches_the_trainer_and_is_owned_by_booster(tmp_path):
    config = load_config("configs/tiny.yaml", ["align.group_by_length=true"])
    kwargs = training_kwargs(config.align, tmp_path / "c", 0, progress=False)
    assert kwargs["train_sampling_strategy"] == "group_by_length"
    assert (
        training_kwargs(config.attack, tmp_path / "c", 0, progress=False)["train_sampling_strategy"]
        == "random"
    )
    with pytest.raises(UserError, match="set align.group_by_length instead"):
        load_config("configs/tiny.yaml", ["align.trainer={train_sampling_strategy: group_by_length}"])
    with pytest.raises(UserError, match="attack.group_by_length must be true/false"):
        load_config("configs/tiny.yaml", ["attack.group_by_length=yes please"])


def test_pipeline_runs_with_every_speed_setting(tmp_path):
    """Grouped alignment and attack (Booster's harmful batches and the probe too) and bf16 generation,
    end to end on the tiny config: each stage gets its own folder, the evaluation says bf16."""
    settings = ["align.group_by_length=true", "attack.group_by_length=true", "evaluate.bf16=true"]
    fast = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "methods=[booster]", *settings])
    plain = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "methods=[booster]"])
    assert align_dir(fast, "booster", 0) != align_dir(plain, "booster", 0)
    results = json.loads(run_pipeline(fast, progress=False, log=lambda *_: None).read_text())
    attacked = [e for e in results if e["stage"] == "attacked"]
    assert attacked and all(e["probe_curve"] for e in attacked)
    assert all(e["provenance"]["precision"].endswith("generation bfloat16") for e in results)
    assert all(0 <= e["harmful_score"] <= 100 for e in results)
