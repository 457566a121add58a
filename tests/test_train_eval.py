"""Periodic evaluation wired into the loop (``eval_every``): the tiny CALICO on its synthetic held-out
split writes ``eval_*`` records at the right steps, identical across two runs; no held-out data ->
evaluation off with a message; the toy task evaluates too. Multi-host data sharding: two simulated
processes read disjoint halves whose union is the single-process global batch."""
import hashlib
import json
import logging

import jax
import numpy as np
import pytest

from calico_jax.train import config as config_lib
from calico_jax.train import tasks as tasks_lib
from calico_jax.train.loop import train

EVAL_KEYS = {"eval_loss", "eval_ce_loss", "eval_mask_iou", "eval_token_accuracy"}


def tiny(extra=()):
    return config_lib.load("configs/tiny.py", [
        ("total_steps", "4"), ("eval_every", "2"), ("checkpoint_every", "100"), ("progress", "false"),
        ("data.synthetic.num_images", "12"), ("data.eval_batches", "2"), ("batch_size", "4"),
        ("mesh", '{"data": 2, "fsdp": 1, "tensor": 1}'), ("num_devices", "2"), *extra])


def eval_records(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if any(k.startswith("eval_") for k in r)], [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the same config in fresh workdirs; the second reuses the first's compiled programs through
    the session's persistent compilation cache (tests/conftest.py: time only, it holds executables, not results)."""
    out = []
    for name in ("a", "b"):
        workdir = tmp_path_factory.mktemp(name)
        train(tiny(), workdir)
        out.append(workdir)
    return out


def test_calico_eval_records_at_eval_steps_and_deterministic(runs):
    ev_a, train_a = eval_records(runs[0])
    ev_b, _ = eval_records(runs[1])
    assert [r["step"] for r in ev_a] == [2, 4] and [r["step"] for r in train_a] == [1, 2, 3, 4]
    for r in ev_a:
        assert set(r) == {"step"} | EVAL_KEYS, r
        assert np.isfinite(r["eval_loss"]) and r["eval_loss"] > 0 and r["eval_ce_loss"] > 0
        assert 0.0 <= r["eval_mask_iou"] <= 1.0 and 0.0 <= r["eval_token_accuracy"] <= 1.0
    assert ev_a[0]["eval_loss"] != ev_a[1]["eval_loss"]       # evaluated the current params, not a cache
    assert ev_a == ev_b                                        # same config, fresh workdir: identical values
    # The held-out split: its own pairs file and images, generated with seed + 1 (no image shared by content).
    data = runs[0] / "data"
    assert (data / "heldout" / "pairs.json").exists()
    digest = lambda d: {hashlib.sha1(f.read_bytes()).hexdigest() for f in d.iterdir()}  # noqa: E731
    held_out = digest(data / "heldout" / "images")
    assert len(held_out) >= 8 and held_out.isdisjoint(digest(data / "train" / "images"))


def test_no_held_out_data_turns_evaluation_off(runs, tmp_path, caplog):
    data = runs[0] / "data"
    cfg = tiny([("data.pairs", str(data / "train" / "pairs.json")), ("data.tokenizer", str(data / "tokenizer"))])
    with caplog.at_level(logging.WARNING):
        task = tasks_lib.build(cfg, tmp_path)
    assert not task.has_eval and "periodic evaluation is off" in caplog.text
    assert not (tmp_path / "data").exists()


def test_toy_eval(tmp_path):
    cfg = config_lib.load("tests/toy_config.py", [("total_steps", "3"), ("eval_every", "1"), ("progress", "false"),
                                             ("checkpoint_every", "100")])
    train(cfg, tmp_path)
    ev, _ = eval_records(tmp_path)
    assert [r["step"] for r in ev] == [1, 2, 3]
    assert all({"eval_loss", "eval_ce_loss", "eval_mask_bce_loss", "eval_mask_dice_loss"} <= set(r) for r in ev)
    assert len({r["eval_loss"] for r in ev}) == 3


def test_two_process_shards_are_disjoint_and_cover_the_global_batch(runs):
    from calico_jax.core.preprocess import Preprocess
    from calico_jax.data.pairs_io import read_pairs
    from calico_jax.data.pipeline import Pipeline, PipelineConfig
    from calico_jax.data.tokenize import load_tokenizer
    data = runs[0] / "data"
    pairs, tok = read_pairs(data / "train" / "pairs.json"), load_tokenizer(data / "tokenizer")
    cfg = PipelineConfig(batch_size=4, max_images=2, max_segs=4, max_tokens=192,
                         preprocess=Preprocess(blip_size=28, dinov2_size=42, dinov2_crop=42, sam_size=32, mask_size=40),
                         num_epochs=None, seed=3, num_threads=1,
                         prefetch_buffer_size=1)
    half = PipelineConfig(**{**cfg.__dict__, "batch_size": 2})

    def batches(pipeline, n=3):
        it = iter(pipeline.dataset())
        return [next(it) for _ in range(n)]

    whole = batches(Pipeline(pairs, tok, cfg, 0, 1))
    shards = [batches(Pipeline(pairs, tok, half, p, 2)) for p in range(2)]
    for step, full in enumerate(whole):
        ids = [set(s[step]["sample_index"].tolist()) for s in shards]
        assert len(ids[0]) == len(ids[1]) == 2 and ids[0].isdisjoint(ids[1])
        assert ids[0] | ids[1] == set(full["sample_index"].tolist())
        # Same rows, same pixels: process p holds global rows [2p, 2p + 2) of the single-process batch (the rows
        # jax.make_array_from_process_local_data places on its devices).
        for p in range(2):
            np.testing.assert_array_equal(shards[p][step]["input_ids"], full["input_ids"][2 * p:2 * p + 2])
            np.testing.assert_array_equal(shards[p][step]["sam_pixel_values"],
                                          full["sam_pixel_values"][2 * p:2 * p + 2])


def test_non_zero_process_builds_nothing_and_waits_at_the_barrier(tmp_path, monkeypatch):
    """Process 1 of 2: process 0 builds the synthetic sets and tokenizer; the others wait for it."""
    from calico_jax.parallel import distributed
    from calico_jax.train import calico_task
    calls = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(distributed, "barrier", calls.append)
    pairs, tok, held_out = calico_task.prepare_data(tiny(), tmp_path)
    assert calls == ["calico_prepare_data"]
    assert not (tmp_path / "data").exists()
    assert (pairs, tok, held_out) == (tmp_path / "data" / "train" / "pairs.json", tmp_path / "data" / "tokenizer",
                                      tmp_path / "data" / "heldout" / "pairs.json")
