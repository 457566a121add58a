"""Inference at scale: the predictor on a mesh of 8 devices (the weights placed by the training rules, rows split
over ``data``) answers as on one device; evaluation by two processes (the launcher) writes what one process
writes; an evaluation killed mid-run (``kill -9`` after batch k, a deterministic hook) resumes to the
uninterrupted predictions; bad meshes are refused with one line and exit code 2.

The pytest process has 8 simulated CPU devices (tests/conftest.py), so the mesh runs happen in process. The model
is the crafted tiny CALICO of tests/test_predict.py (a known answer with one [SEG] routed to image 2, so every
sample has a mask from the real SAM decoder path), plus a random one whose answers are free-running tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from calico_jax.checkpoints import converted as pretrained
from calico_jax.inference.evaluate import main as evaluate_main
from calico_jax.inference.predict import build_question
from calico_jax.inference.predictor import InferenceConfig, Predictor
from calico_jax.inference.stream import KILL_ENV
from calico_jax.models.calico import Calico
from tests import test_predict
from tests.helpers import nothing_at
from tests.test_predict import _config, _images

# the module-scoped fixtures of tests/test_predict.py, shared here (built once per module)
tokenizer, crafted = test_predict.tokenizer, test_predict.crafted
ckpt, heldout = test_predict.ckpt, test_predict.heldout

ROOT = Path(__file__).resolve().parents[1]
MESHES = ({"data": 4, "tensor": 2}, {"data": 8})


def _samples(n=3):
    return [(_images(seed), build_question(2, "common-parts")) for seed in range(n)]


def _compare(one, other):
    """Same tokens (answers), same masks: labels, images and every pixel."""
    assert [p.answer for p in other] == [p.answer for p in one]
    assert [p.num_tokens for p in other] == [p.num_tokens for p in one]
    for a, b in zip(one, other):
        assert [(m.label, m.image) for m in b.masks] == [(m.label, m.image) for m in a.masks]
        for ma, mb in zip(a.masks, b.masks):
            np.testing.assert_array_equal(mb.mask, ma.mask)
            assert mb.score == pytest.approx(ma.score, rel=1e-5)


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_mesh_predictions_equal_one_device(crafted, tokenizer, mesh):
    module, params, single = crafted
    samples = _samples()
    ref = single.predict(samples, batch_size=3)
    assert all(len(p.masks) == 1 for p in ref)
    pred = Predictor(module, params, tokenizer, InferenceConfig(max_new_tokens=24), mesh=mesh)
    assert pred.padded_rows(3) == mesh["data"]   # a batch of 3 rows runs as 4 (8) rows split over data
    big = [leaf for leaf in jax.tree.leaves(pred.params) if leaf.size > 1000]
    if "tensor" in mesh:   # the rules shard the big weights over tensor
        assert any(not leaf.sharding.is_fully_replicated for leaf in big)
    _compare(ref, pred.predict(samples, batch_size=3))


def test_predict_cli_on_a_mesh(ckpt, tmp_path):
    """``python -m calico_jax.predict --mesh ...``: the same answer and mask files as without a mesh."""
    from PIL import Image

    from calico_jax.inference.predict import main as predict_main
    paths = []
    for k, im in enumerate(_images(0)):
        paths += ["--image", str(tmp_path / f"{k}.png")]
        Image.fromarray(im).save(paths[-1])
    outs = {}
    for name, extra in (("one", []), ("mesh", ["--mesh", '{"data": 4, "tensor": 2}', "--dtype", "float32"])):
        outs[name] = tmp_path / name
        assert predict_main(["--ckpt", str(ckpt), *paths, "--task", "common-parts", "--out", str(outs[name]),
                             *extra]) == 0
    one, mesh = (json.loads((outs[k] / "predictions.json").read_text()) for k in ("one", "mesh"))
    assert mesh == one and len(one["masks"]) == 1


def test_mesh_free_running_tokens_equal_one_device(tokenizer):
    """A random model (non-zero CAMs): its answers are whatever greedy decoding picks, on 1 and on 8 devices."""
    module = Calico(_config(tokenizer, zero_init=False))
    params = pretrained.init_params(module, seed=3)
    cfg = InferenceConfig(max_new_tokens=8)
    samples = _samples(2)
    ref = Predictor(module, params, tokenizer, cfg).predict(samples, batch_size=2)
    _compare(ref, Predictor(module, params, tokenizer, cfg, mesh={"data": 2, "tensor": 2, "fsdp": 2}).predict(
        samples, batch_size=2))


@pytest.mark.parametrize("mesh, needle", [
    ('{"data": 3}', 'does not fit the 8 devices'),
    ('{"data": 2, "tensor": 4}', 'tensor axis 4 does not divide the LLM\'s num_key_value_heads=2'),
    ('{"rows": 2}', "unknown axis ['rows']"),
    ('data=2', 'not JSON'),
])
def test_bad_mesh_exits_2_with_one_line(ckpt, heldout, tmp_path, capsys, mesh, needle):
    out, saved = tmp_path / "report.json", tmp_path / "pred.json"
    rc = evaluate_main(["--ckpt", str(ckpt), "--pairs", str(heldout), "--limit", "2", "--out", str(out),
                        "--save_predictions", str(saved), "--mesh", mesh, "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and mesh in err and len(err.splitlines()) == 1, err
    assert nothing_at(out) and nothing_at(saved) and nothing_at(tmp_path / "pred.json.parts")


# ------------------------------------------------------------------------------ evaluation, several processes
def _cli(*argv, env=None, timeout=900):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def _eval_args(ckpt, heldout, out: Path, n=6):
    return ["--ckpt", str(ckpt), "--pairs", str(heldout), "--limit", str(n), "--out", str(out / "report.json"),
            "--save_predictions", str(out / "pred.json"), "--batch_size", "2", "--no_progress"]


@pytest.fixture(scope="module")
def one_process(ckpt, heldout, tmp_path_factory):
    """The reference: one process, uninterrupted."""
    out = tmp_path_factory.mktemp("one")
    assert evaluate_main(_eval_args(ckpt, heldout, out)) == 0
    assert not (out / "pred.json.parts").exists()   # removed once the report is written
    return out


def _same(a: Path, b: Path):
    assert (b / "pred.json").read_text() == (a / "pred.json").read_text()
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert rb == ra


def test_two_process_evaluate_equals_one_process(one_process, ckpt, heldout, tmp_path):
    r = _cli("-m", "calico_jax.launch", "--local", "2", "--devices-per-process", "4", "--",
             "-m", "calico_jax.evaluate", *_eval_args(ckpt, heldout, tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    _same(one_process, tmp_path)
    assert not (tmp_path / "pred.json.parts").exists()


def test_kill_9_mid_evaluation_then_rerun_gives_the_uninterrupted_predictions(one_process, ckpt, heldout, tmp_path):
    args = ["-m", "calico_jax.evaluate", *_eval_args(ckpt, heldout, tmp_path)]
    r = _cli(*args, env={KILL_ENV: "2"})          # SIGKILL right after the 2nd batch of 3 is on disk
    assert r.returncode == -9, r.stderr[-3000:]
    part = tmp_path / "pred.json.parts" / "p0-of-1.jsonl"
    lines = part.read_text().splitlines()
    assert len(lines) == 1 + 4 and not (tmp_path / "report.json").exists()   # header + 2 batches of 2
    with open(part, "ab") as f:                    # and a torn write of the next batch
        f.write(b'{"batch": 2, "id": "' + json.loads(lines[1])["id"].encode()[:3])
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    _same(one_process, tmp_path)


# ------------------------------------------------------------------------------------------ the AOT plan
@pytest.mark.parametrize("qformer_text", [False, True], ids=["qformer_text_off", "qformer_text_on"])
def test_predict_plan_places_weights_by_the_mesh_and_splits_rows(qformer_text):
    """``train.py --compile_only --program predict``'s program on data 2 x tensor 2, weights in bfloat16: one
    prompt per data device, rows split over data, the big weights sharded over tensor, Q-Former tokens exactly
    when the model reads them."""
    from calico_jax.parallel.sharding import make_mesh
    from calico_jax.plans.predict_plan import lower_predict
    from tests.test_aot_targets import small_calico

    cfg = small_calico({"data": 2, "fsdp": 1, "tensor": 2}, frozen_dtype="bfloat16",
                       **{"model.qformer_text_input": str(qformer_text).lower()})
    mesh = make_mesh(cfg.mesh, jax.devices()[:4])
    _, lowered, params = lower_predict(cfg, mesh)
    compiled = lowered.compile()
    param_sh, input_sh = compiled.input_shardings[0][:2]
    assert input_sh.input_ids.shard_shape(lowered.args_info[0][1].input_ids.shape)[0] == 1   # 2 rows over data 2
    assert (input_sh.qformer_input_ids is not None) == qformer_text
    floats = [a for a in jax.tree.leaves(params) if jax.numpy.issubdtype(a.dtype, jax.numpy.floating)]
    assert floats and all(a.dtype == jax.numpy.bfloat16 for a in floats)
    assert any("tensor" in str(s.spec) for s in jax.tree.leaves(param_sh, is_leaf=lambda x: x is None)
               if s is not None)


# ------------------------------------------------------------------------------------------ the part file
def test_part_file_keeps_whole_batches_only(tmp_path):
    from calico_jax.inference.stream import PartFile
    expected = {0: ["a", "b"], 1: ["c", "d"], 2: ["e", "f"]}
    path = tmp_path / "p0-of-1.jsonl"
    part = PartFile(path, {"x": 1}, expected).open()
    part.append(0, [{"id": "a"}, {"id": "b"}])
    part.append(1, [{"id": "c"}, {"id": "d"}])
    whole = path.read_bytes()
    with open(path, "ab") as f:   # batch 2 half written: one whole line of two, then a torn one
        f.write(b'{"batch": 2, "id": "e"}\n{"batch": 2, "i')
    again = PartFile(path, {"x": 1}, expected).open()
    assert again.pending() == [2] and path.read_bytes() == whole
    assert list(again.records()) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match=r"other settings \(x: 1, now 2\)"):
        PartFile(path, {"x": 2}, expected).open()
