"""grain pipeline on a 20-image synthetic set: batch keys/shapes/dtypes, padding, labels, [SEG] <-> mask
routing, masks equal to the processor's transform of the pair file's RLEs, augmentation keeps masks
with their image, determinism by seed, per-process shards, exact resume (with and without workers),
too-long samples dropped and counted, a missing image skipped."""
import numpy as np
import pytest

from calico_jax.core.preprocess import Preprocess
from calico_jax.core.tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX, SEG_TOKEN
from calico_jax.data import pairs
from calico_jax.data.pipeline import Augment, Decode, Pipeline, PipelineConfig, measure_throughput
from calico_jax.data.processors import BlipProcessor, SamProcessor, load_image
from calico_jax.data.rle import decode
from tests.helpers import pipeline_batches, synthetic_pairs

TINY = dict(batch_size=4, max_images=2, max_segs=12, max_tokens=256, num_threads=2, prefetch_buffer_size=2,
            preprocess=Preprocess(blip_size=32, dinov2_size=40, dinov2_crop=28, sam_size=96, mask_size=64))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    p, tok = synthetic_pairs(d, 20)
    return d, p, tok


batches = pipeline_batches


def test_batch_shapes_dtypes_padding_labels_and_masks(data):
    _, p, tok = data
    cfg = PipelineConfig(**TINY, hflip=0.0, color_jitter=0.0)
    pipe = Pipeline(p, tok, cfg, 0, 1)
    assert len(pipe.records) == len(p) and len(pipe.report) == 0
    out = batches(pipe, 3)
    B, N, S, T = 4, 2, 12, 256
    want = {"input_ids": ((B, T), np.int32), "labels": ((B, T), np.int32), "attention_mask": ((B, T), np.int32),
            "pixel_values": ((B, N, 32, 32, 3), np.float32), "dino_pixel_values": ((B, N, 28, 28, 3), np.float32),
            "sam_pixel_values": ((B, N, 96, 96, 3), np.float32), "image_valid": ((B, N), np.bool_),
            "original_hw": ((B, N, 2), np.int32), "resized_hw": ((B, N, 2), np.int32),
            "mask_hw": ((B, N, 2), np.int32), "masks": ((B, S, 64, 64), np.bool_),
            "mask_valid": ((B, S), np.bool_), "seg_image": ((B, S), np.int32), "task": ((B,), np.int32),
            "sample_index": ((B,), np.int32)}
    seg_id, eos = tok.convert_tokens_to_ids(SEG_TOKEN), tok.eos_token_id
    im_end = tok.convert_tokens_to_ids("<im_end>")
    blip, msam = BlipProcessor(32), SamProcessor(64)
    for b in out:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
        for r in range(B):
            s = p.samples[b["sample_index"][r]]
            ids, lab, att = b["input_ids"][r], b["labels"][r], b["attention_mask"][r]
            L = int(att.sum())
            assert att[:L].all() and not att[L:].any()
            assert (ids[L:] == tok.pad_token_id).all() and (lab[L:] == IGNORE_INDEX).all()
            # Images: one slot each, ignored in labels; valid flags and sizes follow the sample.
            n_img = len(s["images"])
            assert (ids == IMAGE_TOKEN_INDEX).sum() == n_img == b["image_valid"][r].sum()
            assert (lab != IMAGE_TOKEN_INDEX).all()
            assert [tuple(x) for x in b["original_hw"][r][:n_img]] == \
                [(p.images[i]["height"], p.images[i]["width"]) for i in s["images"]]
            assert not b["sam_pixel_values"][r][n_img:].any() and not b["pixel_values"][r][n_img:].any()
            np.testing.assert_array_equal(b["pixel_values"][r][0], blip(load_image(p.image_path(s, 0))))
            # Labels: -100 up to the end of the prompt, then exactly the answer ids through </s>.
            first = int(np.argmax(lab != IGNORE_INDEX))
            assert (lab[:first] == IGNORE_INDEX).all() and (lab[first:L] == ids[first:L]).all()
            assert ids[L - 1] == eos and first > np.flatnonzero(ids == IMAGE_TOKEN_INDEX).max()
            assert tok.decode(ids[first:L - 1]).strip() == s["answer"]
            assert ids[np.flatnonzero(ids == IMAGE_TOKEN_INDEX) + 1].tolist() == [im_end] * n_img
            # [SEG]: all are targets; k-th [SEG] <-> k-th mask, its image, and the RLE it references.
            segs = np.flatnonzero(ids == seg_id)
            assert len(segs) == len(s["segs"]) == b["mask_valid"][r].sum() and (segs >= first).all()
            assert b["mask_valid"][r][:len(segs)].all()
            assert b["seg_image"][r][:len(segs)].tolist() == [g["image"] for g in s["segs"]]
            for j, g in enumerate(s["segs"]):
                want_m = msam.masks(decode(p.masks[g["mask"]]["rle"])[None])[0]
                np.testing.assert_array_equal(b["masks"][r, j], want_m)
                h, w = b["mask_hw"][r, g["image"]]
                assert b["masks"][r, j, :h, :w].any() and not b["masks"][r, j, h:].any() \
                    and not b["masks"][r, j, :, w:].any()
            assert not b["masks"][r, len(segs):].any() and not b["seg_image"][r, len(segs):].any()
            assert pairs.TASKS[b["task"][r]] == s["task"]


def test_augmentation_moves_masks_with_their_image(data):
    _, p, _ = data
    ex = Decode(p).map({"index": next(i for i, s in enumerate(p.samples) if s["task"] == "unique_parts"),
                        "input_ids": None, "labels": None})
    seen = set()
    for seed in range(12):
        out = Augment(0.5, 0.0).random_map(ex, np.random.default_rng(seed))
        for k, im in enumerate(ex["images"]):
            flipped = np.array_equal(out["images"][k], im[:, ::-1])
            assert flipped or np.array_equal(out["images"][k], im)
            seen.add(flipped)
            for j in (j for j, i in enumerate(ex["seg_image"]) if i == k):
                np.testing.assert_array_equal(out["masks"][j], ex["masks"][j][:, ::-1] if flipped else ex["masks"][j])
    assert seen == {True, False}
    jit = Augment(0.0, 0.3).random_map(ex, np.random.default_rng(0))
    assert not np.array_equal(jit["images"][0], ex["images"][0])
    assert all(np.array_equal(a, m) for a, m in zip(jit["masks"], ex["masks"]))


def test_determinism_by_seed_and_process_shards(data):
    _, p, tok = data
    cfg = PipelineConfig(**{**TINY, "batch_size": 2}, seed=3)
    a, b = batches(Pipeline(p, tok, cfg, 0, 1), 3), batches(Pipeline(p, tok, cfg, 0, 1), 3)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    other = batches(Pipeline(p, tok, PipelineConfig(**{**TINY, "batch_size": 2}, seed=4), 0, 1), 3)
    assert np.concatenate([x["sample_index"] for x in a]).tolist() != \
        np.concatenate([x["sample_index"] for x in other]).tolist()
    # Augmentation is seeded too: same sample, other seed -> other pixels somewhere.
    cfg1 = PipelineConfig(**{**TINY, "batch_size": 1, "drop_remainder": False}, seed=3, hflip=0.0, color_jitter=0.0)
    halves = [batches(Pipeline(p, tok, cfg1, i, 2)) for i in range(2)]
    idx = [[int(x["sample_index"][0]) for x in h] for h in halves]
    assert not set(idx[0]) & set(idx[1]) and sorted(idx[0] + idx[1]) == list(range(len(p)))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_next_batch(data, workers):
    _, p, tok = data
    cfg = PipelineConfig(**{**TINY, "batch_size": 3}, worker_count=workers, num_epochs=None, seed=1)
    ds = Pipeline(p, tok, cfg, 0, 1).dataset()
    it = iter(ds)
    try:
        seen = [next(it)["sample_index"].tolist() for _ in range(38)]   # 108 / 3 = 36 batches an epoch
        state = it.get_state()
        # With workers the state is mp_prefetch's (one sub-iterator state per worker).
        assert len(state.get("iterators_in_use_states", [])) == workers
        want = [next(it) for _ in range(2)]
    finally:
        it.close()
    it2 = iter(Pipeline(p, tok, cfg, 0, 1).dataset())
    try:
        it2.set_state(state)
        got = [next(it2) for _ in range(2)]
    finally:
        it2.close()
    for w, g in zip(want, got):
        assert all(np.array_equal(w[k], g[k]) for k in w)
    # The resumed position is in epoch 2, which is reshuffled (not epoch 1 again).
    assert sorted(sum(seen[:36], [])) == list(range(len(p)))
    assert seen[36:] + [w["sample_index"].tolist() for w in want] != seen[:4]


def test_too_long_and_too_many_segs_are_dropped_and_counted(data):
    _, p, tok = data
    cfg = PipelineConfig(**{**TINY, "max_tokens": 130, "max_segs": 6})
    pipe = Pipeline(p, tok, cfg, 0, 1)
    counts = pipe.report.counts()
    n_many = sum(len(s["segs"]) > 6 for s in p.samples)
    assert n_many > 0 and counts["too_many_segs"] == n_many
    assert counts.get("too_long_seg", 0) > 0 and len(pipe.records) + len(pipe.report) == len(p)
    seg_id = tok.convert_tokens_to_ids(SEG_TOKEN)
    full = Pipeline(p, tok, PipelineConfig(**{**TINY, "max_tokens": 10_000, "max_segs": 6}), 0, 1)
    full_len = {r["index"]: len(r["input_ids"]) for r in full.records}
    for kind, rec, _ in pipe.report.entries:
        if kind == "too_long_seg":
            i = next(j for j, s in enumerate(p.samples) if f"sample {s['id']}" == rec)
            assert full_len[i] > 130
    for r in pipe.records:   # kept: within the limit and every [SEG] present with its mask
        assert len(r["input_ids"]) <= 130
        assert (r["input_ids"] == seg_id).sum() == len(p.samples[r["index"]]["segs"])
    # A limit that only cuts the final "</s>" of the longest sample keeps it, cut at its tail.
    longest = max(full_len, key=full_len.get)
    cut = Pipeline(p, tok, PipelineConfig(**{**TINY, "max_tokens": full_len[longest] - 1, "max_segs": 6}), 0, 1)
    kept = {r["index"]: r for r in cut.records}
    assert len(cut.report) == n_many and len(kept[longest]["input_ids"]) == full_len[longest] - 1
    assert kept[longest]["input_ids"][-1] != tok.eos_token_id
    b = batches(pipe, 2)[0]
    assert b["input_ids"].shape == (4, 130) and (b["mask_valid"].sum(1) == (b["input_ids"] == seg_id).sum(1)).all()


def test_missing_image_is_skipped_not_fatal(data, tmp_path):
    d, _, tok = data
    import shutil
    shutil.copytree(d / "syn" / "images", tmp_path / "images")
    (tmp_path / "images" / "000003.jpg").unlink()
    p = pairs.read_pairs(d / "p.json", images_root=tmp_path / "images")
    bad = {i for i, s in enumerate(p.samples) if any(p.images[j]["file"] == "000003.jpg" for j in s["images"])}
    assert bad
    pipe = Pipeline(p, tok, PipelineConfig(**{**TINY, "batch_size": 1, "drop_remainder": False}), 0, 1)
    got = [int(b["sample_index"][0]) for b in batches(pipe)]
    assert sorted(got) == sorted(set(range(len(p))) - bad)


def test_measure_throughput(data):
    _, p, tok = data
    r = measure_throughput(Pipeline(p, tok, PipelineConfig(**TINY), 0, 1), num_batches=3, warmup=1)
    assert r["batches"] == 3 and r["samples"] == 12 and r["samples_per_s"] > 0
