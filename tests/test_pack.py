"""Packed pairs (calico_jax.data.pack / packed): the streaming packer and its index, the packed reader's Pairs
interface, pipeline batches equal to the JSON path's, read-time skips counted by kind (and ``strict``), per-process
blocks independent of the worker count, resume onto another process count, and the CLI's bad-input contract."""
import io
import json
import pickle
import shutil

import numpy as np
import pytest
from array_record.python import array_record_module

from calico_jax.checkpoints.training import translate_data_state
from calico_jax.core.preprocess import Preprocess
from calico_jax.data import pack, pairs
from calico_jax.data.packed import PackedPairs
from calico_jax.data.pipeline import Pipeline, PipelineConfig
from calico_jax.data.skips import DataError
from tests.helpers import pipeline_batches, synthetic_pairs

TINY = dict(batch_size=4, max_images=2, max_segs=12, max_tokens=256, num_threads=2, prefetch_buffer_size=2,
            preprocess=Preprocess(blip_size=32, dinov2_size=0, dinov2_crop=0, sam_size=64, mask_size=32))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack")
    p, tok = synthetic_pairs(d, 12, "--check_images", "none")
    assert pack.main(["--pairs", str(d / "p.json"), "--out", str(d / "packed"), "--shard_size", "25",
                      "--quiet"]) == 0
    return d, p, tok


batches = pipeline_batches


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_index_counts_and_the_pairs_interface(data):
    d, p, _ = data
    q = pairs.read_pairs(d / "packed")
    assert isinstance(q, PackedPairs) and len(q) == len(p)
    ix = q.index
    assert ix["total"] == len(p) and [s["count"] for s in ix["shards"]] == [25] * (len(p) // 25) + [len(p) % 25]
    assert ix["counts"] == {t: sum(s["task"] == t for s in p.samples) for t in pairs.TASKS}
    assert ix["image_counts"] == {"2": len(p)} and ix["sources"] == p.sources
    assert ix["images"]["count"] == len(p.images) and ix["masks"]["count"] == len(p.masks)
    assert ix["report"]["counts"] == {}
    # masks stored once: the table is smaller than the samples' masks written inline
    assert ix["mask_bytes"]["table"] < ix["mask_bytes"]["inline"]
    assert list(q.samples) == p.samples and q.samples[3:7] == p.samples[3:7] and q.samples[-1] == p.samples[-1]
    assert list(q.images) == p.images and list(q.masks) == p.masks
    s = p.samples[5]
    assert q.image_path(s, 1) == p.image_path(s, 1) and np.array_equal(q.mask(s["segs"][0]), p.mask(s["segs"][0]))


def test_stream_parser_matches_json_loads_on_any_chunking():
    doc = {"format": "x", "n": 12345678, "f": -1.5e3, "t": True, "z": None, "s": "a\"b\\u00e9}]",
           "images": [{"a": [1, 2, {"b": "]"}]}, 7], "samples": [], "masks": [3.25, "x"], "tail": {"k": [1]}}
    text = json.dumps(doc, indent=1)
    for chunk in (1, 2, 5, 64, 1 << 20):
        got, arrays = {}, {}
        for k, v in pack.JsonStream(io.StringIO(text), chunk=chunk):
            if k in pack.ARRAYS:
                arrays.setdefault(k, [])
                if v is not pack.JsonStream.ARRAY_END:
                    arrays[k].append(v)
            else:
                got[k] = v
        assert {**got, **arrays} == doc


def test_packed_batches_equal_the_json_batches(data):
    d, p, tok = data
    q = pairs.read_pairs(d / "packed")
    cfg = PipelineConfig(**TINY, seed=2, num_epochs=2)   # shuffled, augmented, two epochs
    a, b = batches(Pipeline(p, tok, cfg, 0, 1), 6), batches(Pipeline(q, tok, cfg, 0, 1), 6)
    assert len(a) == 6 and same(a, b)


def test_the_graph_pickles_as_paths_not_records(data):
    d, p, tok = data
    q = pairs.read_pairs(d / "packed")
    blob = pickle.dumps(Pipeline(q, tok, PipelineConfig(**TINY), 0, 1).map_dataset())
    assert p.samples[0]["answer"].encode() not in blob and p.masks[0]["rle"]["counts"].encode() not in blob
    assert str(d / "packed").encode() in blob and len(blob) < 200_000


def _corrupt(d, tmp_path, bad: dict[int, bytes]):
    """A copy of the packed set whose sample records ``bad`` are replaced (one shard)."""
    out = tmp_path / "corrupt"
    shutil.copytree(d / "packed", out)
    ix = json.loads((out / "index.json").read_text())
    recs = [r for sh in ix["shards"] for r in
            array_record_module.ArrayRecordReader(str(out / sh["file"])).read_all()]
    for sh in ix["shards"]:
        (out / sh["file"]).unlink()
    w = array_record_module.ArrayRecordWriter(str(out / "samples-00000-of-00001.array_record"), pack.WRITE_OPTIONS)
    for i, r in enumerate(recs):
        w.write(bad.get(i, r))
    w.close()
    ix["shards"] = [{"file": "samples-00000-of-00001.array_record", "count": len(recs)}]
    (out / "index.json").write_text(json.dumps(ix))
    return out


def test_bad_records_are_skipped_and_counted_by_kind_and_strict_stops(data, tmp_path):
    d, p, tok = data
    s1 = dict(p.samples[1], answer=p.samples[1]["answer"].replace("(IMAGE1)", "(IMAGE2)", 1))
    s2 = dict(p.samples[2], segs=[dict(g, mask=10 ** 6) for g in p.samples[2]["segs"]])
    many = max(range(len(p)), key=lambda i: len(p.samples[i]["segs"]))
    bad = {0: b"not json{", 1: json.dumps(s1).encode(), 2: json.dumps(s2).encode(), 3: b"[1, 2]"}
    out = _corrupt(d, tmp_path, bad)
    cfg = PipelineConfig(**{**TINY, "batch_size": 1, "max_segs": len(p.samples[many]["segs"]) - 1},
                         shuffle=False, hflip=0.0, color_jitter=0.0)
    n_many = sum(len(s["segs"]) > cfg.max_segs for i, s in enumerate(p.samples) if i not in bad)
    pipe = Pipeline(pairs.read_pairs(out), tok, cfg, 0, 1)
    got = [int(b["sample_index"][0]) for b in batches(pipe)]
    assert all("skips" not in b for b in batches(Pipeline(pairs.read_pairs(out), tok, cfg, 0, 1), 2))
    kept = [i for i, s in enumerate(p.samples) if i not in bad and len(s["segs"]) <= cfg.max_segs]
    assert got == kept and n_many > 0
    assert pipe.report.counts() == {"bad_record": 2, "bad_sample": 2, "too_many_segs": n_many}
    with pytest.raises(DataError, match="bad_record: sample record 0"):
        batches(Pipeline(pairs.read_pairs(out), tok, cfg, 0, 1, strict=True), 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_process_blocks_are_disjoint_deterministic_and_worker_independent(data, workers):
    d, p, tok = data
    q = pairs.read_pairs(d / "packed")
    cfg = PipelineConfig(**{**TINY, "batch_size": 2}, seed=5, hflip=0.0, color_jitter=0.0)
    one = np.concatenate([b["sample_index"] for b in batches(Pipeline(q, tok, cfg, 0, 1))]).tolist()
    wcfg = PipelineConfig(**{**TINY, "batch_size": 2}, seed=5, hflip=0.0, color_jitter=0.0, worker_count=workers)
    if workers == 0:   # a process reads the records of its block and no other
        read, raw = [], q.samples.raw
        q.samples.raw = lambda i: read.append(i) or raw(i)
        mine = np.concatenate([b["sample_index"] for b in batches(Pipeline(q, tok, wcfg, 1, 2))])
        del q.samples.raw
        assert sorted(read) == sorted(mine.tolist()) and len(mine) == len(p) // 4 * 2
    halves = [np.stack([b["sample_index"] for b in batches(Pipeline(q, tok, wcfg, i, 2))]) for i in range(2)]
    assert not set(halves[0].ravel()) & set(halves[1].ravel())
    again = np.stack([b["sample_index"] for b in batches(Pipeline(q, tok, wcfg, 1, 2))])
    assert np.array_equal(again, halves[1])
    # process i holds rows [2i, 2i+2) of every global batch of 4: together the single-process stream
    ref = np.asarray(one[:len(p) // 4 * 4]).reshape(-1, 4)
    for i in range(2):
        if workers == 0:
            assert np.array_equal(halves[i], ref[:, 2 * i:2 * i + 2])
        else:   # the same block; grain's workers batch every other element of it, so only the order differs
            assert sorted(halves[i].ravel()) == sorted(ref[:, 2 * i:2 * i + 2].ravel())


def test_resume_onto_another_process_count(data):
    d, _, tok = data
    q = pairs.read_pairs(d / "packed")
    cfg = PipelineConfig(**{**TINY, "batch_size": 2}, seed=1, num_epochs=None)
    its = [iter(Pipeline(q, tok, cfg, i, 2).dataset()) for i in range(2)]
    try:
        for _ in range(5):
            for it in its:
                next(it)
        saved = {i: it.get_state() for i, it in enumerate(its)}
    finally:
        for it in its:
            it.close()
    state = translate_data_state(saved, 1, 4)
    full = PipelineConfig(**{**TINY, "batch_size": 4}, seed=1, num_epochs=None)
    ref, it2 = iter(Pipeline(q, tok, full, 0, 1).dataset()), iter(Pipeline(q, tok, full, 0, 1).dataset())
    try:
        want = [next(ref) for _ in range(7)][5:]
        it2.set_state(state)
        got = [next(it2) for _ in range(2)]
    finally:
        ref.close()
        it2.close()
    assert same(want, got)


@pytest.mark.parametrize("text", ['{"format": "calico_jax.pairs", "version": 1, "samples": [',
                                  '{"format": "other", "version": 1}', "[1, 2]",
                                  '{"format": "calico_jax.pairs", "version": 1, "sources": []}'])
def test_cli_bad_input_exits_2_with_one_line_and_leaves_nothing(tmp_path, capsys, text):
    (tmp_path / "bad.json").write_text(text)
    assert pack.main(["--pairs", str(tmp_path / "bad.json"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.json"]


def test_strict_pack_stops_at_a_bad_sample(data, tmp_path):
    d, p, _ = data
    raw = json.loads((d / "p.json").read_text())
    raw["samples"][4]["answer"] = raw["samples"][4]["answer"].replace("[SEG]", "", 1)
    (tmp_path / "p.json").write_text(json.dumps(raw))
    assert pack.main(["--pairs", str(tmp_path / "p.json"), "--out", str(tmp_path / "o"), "--quiet", "--strict"]) == 2
    assert not (tmp_path / "o").exists()
    ix = pack.pack(tmp_path / "p.json", tmp_path / "o", progress=False)
    assert ix["total"] == len(p) - 1 and ix["report"]["counts"] == {"bad_sample": 1}


def test_several_files_pack_together_with_mixed_image_counts(data, tmp_path):
    d, p, tok = data
    ann = d / "syn" / "annotations.json"
    assert pairs.main(["--coco", str(ann), "--images", str(d / "syn" / "images"), "--out", str(tmp_path / "p3.json"),
                       "--seed", "1", "--num_images", "3", "--check_images", "none"]) == 0
    p3 = pairs.read_pairs(tmp_path / "p3.json")
    assert pack.main(["--pairs", str(d / "p.json"), str(tmp_path / "p3.json"), "--out", str(tmp_path / "both"),
                      "--quiet"]) == 0
    q = pairs.read_pairs(tmp_path / "both")
    assert len(q) == len(p) + len(p3) and q.index["image_counts"] == {"2": len(p), "3": len(p3)}
    assert len(q.images) == len(p.images) + len(p3.images) and len(q.sources) == 2
    for j in (0, len(p3) - 1):
        s, t = q.samples[len(p) + j], p3.samples[j]
        assert [q.image_path(s, k) for k in range(3)] == [p3.image_path(t, k) for k in range(3)]
        assert [q.masks[g["mask"]]["rle"] for g in s["segs"]] == [p3.masks[g["mask"]]["rle"] for g in t["segs"]]
    cfg = PipelineConfig(**{**TINY, "max_images": 3, "batch_size": 8}, hflip=0.0, color_jitter=0.0)
    seen = np.concatenate([b["image_valid"].sum(1) for b in batches(Pipeline(q, tok, cfg, 0, 1), 6)])
    assert set(seen.tolist()) == {2, 3}
