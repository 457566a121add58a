"""calico_jax.inference.predictor / predict: KV-cache generation with CAMs equals the full forward; masks from the
kept hidden
states equal the training graph's masks; the predict CLI end to end and on bad input.

The end-to-end checks use a *crafted* tiny CALICO whose greedy answer is known: every decoder layer's output
projections (o_proj, down_proj) are zero, so the final hidden state at a position is RMSNorm(embedding of its
token), and ``lm_head`` maps the chosen tokens to their successors in "<p> wheel </p> [SEG] (IMAGE2)</s>".
"""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from calico_jax.checkpoints import converted as pretrained
from calico_jax.core import fs
from calico_jax.core.tokens import SEG_TOKEN
from calico_jax.data.rle import decode
from calico_jax.data.tokenize import build_tiny_tokenizer
from calico_jax.inference.ask import ask, build_question
from calico_jax.inference.predict import main as predict_main
from calico_jax.inference.predict import read_image
from calico_jax.inference.predictor import (
    INFERENCE_FILE,
    InferenceConfig,
    Predictor,
    generate_program,
    load_predictor,
    mask_program,
)
from calico_jax.models.calico import Calico, CalicoConfig
from calico_jax.models.inputs import CalicoInputs
from tests.helpers import nothing_at

ANSWER = "<p> wheel</p>[SEG] (IMAGE2)"   # every token distinct (see crafted)
SIZES = ((37, 53), (61, 45))          # (H, W) of the two test images: odd, non-square, different


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from calico_jax.data.tokenize import DEFAULT_CORPUS
    texts = list(DEFAULT_CORPUS) + ["The images show <p> wheel </p> [SEG] (IMAGE1) [SEG] (IMAGE2)."] * 8
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), texts, vocab_size=256)


def _config(tokenizer, **cam):
    base = CalicoConfig.tiny()
    return base.replace(llm=base.llm.replace(vocab_size=len(tokenizer)), cam=base.cam.replace(**cam),
                        seg=base.seg.replace(token_id=tokenizer.convert_tokens_to_ids(SEG_TOKEN), identifier_ids=()),
                        preprocess=base.preprocess.replace(mask_size=64))


@pytest.fixture(scope="module")
def crafted(tokenizer):
    """(module, params, predictor) whose greedy answer to any two-image prompt is ANSWER."""
    module = Calico(_config(tokenizer))
    params = pretrained.init_params(module, seed=1)
    llm = params["llm"]
    for name, layer in llm["model"].items():
        if name.startswith("layers_"):
            layer["self_attn"]["o_proj"]["kernel"] = jnp.zeros_like(layer["self_attn"]["o_proj"]["kernel"])
            layer["mlp"]["down_proj"]["kernel"] = jnp.zeros_like(layer["mlp"]["down_proj"]["kernel"])
    predictor = Predictor(module, params, tokenizer, InferenceConfig(max_new_tokens=24))
    chain = [predictor.prompt_ids(build_question(2, "common-parts"), 2)[-1]]
    chain += tokenizer(ANSWER, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert len(set(chain[:-1])) == len(chain) - 1, "the crafted chain needs distinct tokens"
    emb = np.asarray(llm["model"]["embed_tokens"]["embedding"], np.float64)
    h = emb / np.sqrt((emb ** 2).mean(-1, keepdims=True) + module.config.llm.rms_norm_eps)   # RMSNorm, scale 1
    w = np.zeros(np.shape(llm["lm_head"]["kernel"]))
    for src, dst in zip(chain[:-1], chain[1:]):
        w[:, dst] += 8.0 * h[src] / (h[src] @ h[src])
    llm["lm_head"]["kernel"] = jnp.asarray(w, jnp.float32)
    return module, params, Predictor(module, params, tokenizer, InferenceConfig(max_new_tokens=24))


def _full_hidden(module, params, ids, mask, pixels, dino, prompt_lengths):
    def run(m, inputs):
        inp = m.embed_inputs(inputs)
        out = m.llm(attention_mask=inp["mask"], inputs_embeds=inp["embeds"], hooks=m.cam_hooks(inp) or None,
                    last_prompt_index=inp["last_prompt_index"])
        return out.hidden_states, out.logits, inp["last_prompt_index"]
    inputs = CalicoInputs(input_ids=ids, attention_mask=mask, pixel_values=pixels, dino_pixel_values=dino,
                          prompt_lengths=prompt_lengths)
    return module.apply({"params": params}, inputs, method=run)


def test_kv_cache_generation_with_cams_equals_full_forward(tokenizer):
    """Random tiny CALICO with non-zero CAMs; two prompts of different lengths (left padding): every kept
    hidden state and every greedy token equals the full forward over prompt + generated tokens."""
    module = Calico(_config(tokenizer, zero_init=False))
    params = pretrained.init_params(module, seed=3)
    pred = Predictor(module, params, tokenizer, InferenceConfig(max_new_tokens=6, prompt_bucket=8))
    prompts = [pred.prompt_ids(build_question(2, "common-object"), 2),
               pred.prompt_ids(build_question(2, prompt="Which parts differ here?"), 2)]
    assert len(prompts[0]) != len(prompts[1])
    width = -(-max(map(len, prompts)) // 8) * 8
    ids = np.full((2, width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((2, width), bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = p, True
    px = [pred.image_fields(_images(r)) for r in range(2)]
    stack = lambda k: jnp.asarray(np.stack([p[k] for p in px]))  # noqa: E731
    inputs = CalicoInputs(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=stack(
        "pixel_values"), dino_pixel_values=stack("dino_pixel_values"), sam_pixel_values=stack("sam_pixel_values"))
    tokens, lengths, hidden, _ = generate_program(params, inputs, module=module, max_new_tokens=6,
                                                  eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    tokens, hidden = np.asarray(tokens), np.asarray(hidden)
    for r, p in enumerate(prompts):
        n = int(lengths[r])
        full_ids = np.asarray([p + tokens[r, :n].tolist()], np.int32)
        h, logits, lpi = _full_hidden(module, params, jnp.asarray(full_ids), jnp.ones_like(full_ids),
                                      stack("pixel_values")[r:r + 1], stack("dino_pixel_values")[r:r + 1],
                                      jnp.asarray([len(p)]))
        start = int(lpi[0])
        ref = np.asarray(h[0, start:start + n])
        err = np.abs(hidden[r, :n] - ref).max() / np.abs(ref).max()
        assert err < 1e-5, err
        np.testing.assert_array_equal(np.asarray(logits[0, start:start + n]).argmax(-1), tokens[r, :n])


def test_crafted_answer_and_masks_match_training_graph(crafted, tokenizer):
    module, params, pred = crafted
    images = _images()
    out = pred.predict([(images, build_question(2, "common-parts"))])[0]
    assert out.answer == ANSWER
    assert not out.truncated and out.num_unrouted == 0
    assert [(m.label, m.image, m.mask.shape) for m in out.masks] == [("wheel", 1, SIZES[1])]

    # The training graph on prompt + answer, [SEG] routed to image 2, masks at the original size.
    prompt = pred.prompt_ids(build_question(2, "common-parts"), 2)
    ids = np.asarray([prompt + tokenizer(ANSWER, add_special_tokens=False).input_ids], np.int32)
    px = {k: jnp.asarray(v)[None] for k, v in pred.image_fields(images).items()}
    res = module.apply({"params": params}, CalicoInputs(
        input_ids=jnp.asarray(ids), attention_mask=jnp.ones_like(ids), pixel_values=px["pixel_values"],
        dino_pixel_values=px["dino_pixel_values"], sam_pixel_values=px["sam_pixel_values"],
        resized_hw=px["resized_hw"], mask_hw=px["original_hw"], prompt_lengths=jnp.asarray([len(prompt)]),
        seg_image=jnp.asarray([[1, 0, 0, 0]])))
    ref = np.asarray(res["mask_logits"][0, 0, :SIZES[1][0], :SIZES[1][1]])
    sure = np.abs(ref) > 1e-4
    np.testing.assert_array_equal(out.masks[0].mask[sure], (ref > 0)[sure])
    prob = 1 / (1 + np.exp(-ref[ref > 0].astype(np.float64)))
    assert out.masks[0].score == pytest.approx(prob.mean(), rel=1e-5)


def test_mask_program_pads_segs_without_changing_results(crafted):
    """The [SEG] count is padded to a bucket: a mask's logits do not depend on its batch-mates."""
    module, params, _ = crafted
    rng = np.random.default_rng(0)
    hid = jnp.asarray(rng.normal(size=(3, module.config.llm.hidden_size)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(3, 4, 4, 16)), jnp.float32)
    hw = jnp.asarray([[32, 24]] * 3)
    one = mask_program(params, hid[:1], emb[:1], hw, jnp.asarray([[40, 30]] * 3)[:1], module=module,
                       mask_size=(64, 64))
    three = mask_program(params, hid, emb, hw, jnp.asarray([[40, 30]] * 3), module=module, mask_size=(64, 64))
    np.testing.assert_allclose(np.asarray(one[0]), np.asarray(three[0]), rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(three[:, 40:]) == 0) and np.all(np.asarray(three[:, :, 30:]) == 0)


# ------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def ckpt(crafted, tokenizer, tmp_path_factory):
    module, params, _ = crafted
    out = tmp_path_factory.mktemp("ckpt") / "model"
    with fs.atomic_directory(out) as tmp:
        pretrained.write(tmp, "calico", module.config, params)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / INFERENCE_FILE).write_text(json.dumps(InferenceConfig(max_new_tokens=24).to_dict()))
    return out


def _save(tmp_path, name, array, mode=None, exif_orientation=None):
    im = Image.fromarray(array)
    im = im.convert(mode) if mode else im
    path = tmp_path / name
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(path, exif=exif)
    else:
        im.save(path)
    return path


def test_predict_cli_end_to_end(ckpt, tmp_path, capsys):
    a, b = _images(5)
    # Image 1 grayscale PNG; image 2 an RGBA PNG.
    pa = _save(tmp_path, "a.png", a, mode="L")
    pb = _save(tmp_path, "b.png", np.dstack([b, np.full(b.shape[:2], 200, np.uint8)]), mode=None)
    out = tmp_path / "out"
    rc = predict_main(["--ckpt", str(ckpt), "--image", str(pa), "--image", str(pb), "--task", "common-parts",
                       "--out", str(out)])
    std = capsys.readouterr()
    assert rc == 0, std.err
    meta = json.loads((out / "predictions.json").read_text())
    assert meta["raw_answer"] == ANSWER and meta["answer"] == "wheel"     # the sentence, grounding tokens out
    assert [m["image"] for m in meta["masks"]] == [1] and meta["masks"][0]["label"] == "wheel"
    assert meta["warnings"] == ["no mask for image 1"]
    lines = (out / "answer.txt").read_text().splitlines()
    assert lines[0] == "wheel" and "wheel" in lines[2] and "image 2" in lines[2]
    assert meta["masks"][0]["file"] in lines[2]
    assert lines[-1] == "warning: no mask for image 1"
    assert std.out.splitlines()[0] == "wheel" and "image 2" in std.out and "warning: no mask for image 1" in std.err
    png = np.asarray(Image.open(out / meta["masks"][0]["file"]))
    assert png.shape == SIZES[1]
    np.testing.assert_array_equal(png > 0, decode(meta["masks"][0]["rle"]))
    for k, (h, w) in enumerate(SIZES):
        ov = Image.open(out / f"overlay_image{k + 1}.png")
        assert ov.width * h == ov.height * w          # the input's aspect ratio (upscaled for labels)
    fig = Image.open(out / "overlay.png")             # both images side by side, legend and answer under them
    assert fig.width > Image.open(out / "overlay_image1.png").width
    # the Python API asks the same question as the CLI and gets the same answer and masks
    api = ask(load_predictor(ckpt), [read_image(pa), read_image(pb)], task="common_parts")
    assert api.sentence == meta["answer"] and api.raw == ANSWER and api.warnings == meta["warnings"]
    assert [(m.label, m.image) for m in api.masks] == [(m["label"], m["image"]) for m in meta["masks"]]
    np.testing.assert_array_equal(api.masks[0].mask, decode(meta["masks"][0]["rle"]))


def test_predict_cli_exif_rotation(ckpt, tmp_path):
    a, b = _images(6)
    pa = _save(tmp_path, "a.jpg", a)
    pb = _save(tmp_path, "b.jpg", b, exif_orientation=6)         # stored W x H, displayed rotated 90°
    out = tmp_path / "out"
    assert predict_main(["--ckpt", str(ckpt), "--image", str(pa), "--image", str(pb), "--prompt",
                         "Can you segment the common parts?", "--out", str(out)]) == 0
    meta = json.loads((out / "predictions.json").read_text())
    assert (meta["images"][1]["height"], meta["images"][1]["width"]) == SIZES[1][::-1]
    assert np.asarray(Image.open(out / meta["masks"][0]["file"])).shape == SIZES[1][::-1]


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such file"), ("not_image", "not an image"), ("no_images", "no images"),
    ("too_large", "above --max_pixels"), ("slots", "2 <image> slots but 1"), ("directory", "not a file"),
    ("bad_ckpt", "neither a calico_jax checkpoint"),
])
def test_predict_cli_bad_input(ckpt, tmp_path, capsys, case, needle):
    good = _save(tmp_path, "g.png", _images()[0])
    args = {"missing": ["--image", str(tmp_path / "nope.jpg")],
            "not_image": ["--image", str((tmp_path / "t.jpg").write_text("hello") and tmp_path / "t.jpg")],
            "no_images": [],
            "too_large": ["--image", str(good), "--max_pixels", "100"],
            "slots": ["--image", str(good), "--prompt", "<image> and <image>: common parts?"],
            "directory": ["--image", str(tmp_path)],
            "bad_ckpt": ["--image", str(good)]}[case]
    if "--prompt" not in args:
        args += ["--task", "common-object"]
    out = tmp_path / "out"
    ck = str(tmp_path) if case == "bad_ckpt" else str(ckpt)
    assert predict_main(["--ckpt", ck, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert nothing_at(out)


# -------------------------------------------------------------------------------------- evaluate CLI
@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from calico_jax.data import pairs, synthetic
    root = tmp_path_factory.mktemp("heldout")
    ann = synthetic.generate(root, 8, seed=3, progress=False)
    assert pairs.main(["--coco", str(ann), "--images", str(root / "images"), "--out", str(root / "pairs.json"),
                       "--check_images", "none"]) == 0
    return root / "pairs.json"


def test_evaluate_cli_and_rescoring_saved_predictions(ckpt, heldout, tmp_path, capsys):
    from calico_jax.inference.evaluate import main as evaluate_main
    data = json.loads(heldout.read_text())
    n = min(6, len(data["samples"]))
    report, saved = tmp_path / "report.json", tmp_path / "pred.json"
    assert evaluate_main(["--ckpt", str(ckpt), "--pairs", str(heldout), "--limit", str(n), "--out", str(report),
                          "--save_predictions", str(saved), "--batch_size", "4", "--overlays",
                          str(tmp_path / "ov"), "--num_overlays", "1", "--no_progress"]) == 0
    table = capsys.readouterr().out
    rep = json.loads(report.read_text())
    assert rep["num_samples"] == n
    assert set(rep["mean"]) == {"AP50", "mIoU", "Recall", "SS", "S-IoU"}
    assert "AP50" in table and "Mean" in table
    for task, metrics in rep["per_task"].items():   # SS is a raw cosine: it may be slightly negative
        assert all(v is None or -100.0 <= v <= 100.0 for v in metrics.values()), (task, metrics)
    preds = json.loads(saved.read_text())["samples"]
    assert len(preds) == n
    for p in preds:   # the crafted model: one "wheel" mask on image 2, at that image's size
        s = next(s for s in data["samples"] if s["id"] == p["id"])
        im = data["images"][s["images"][1]]
        assert [(m["label"], m["image"], m["rle"]["size"]) for m in p["masks"]] == [
            ("wheel", 1, [im["height"], im["width"]])]
    first = data["samples"][0]["id"]
    ov = Image.open(tmp_path / "ov" / f"{first}.png")       # prediction above ground truth, images side by side
    assert ov.width > 2 * SIZES[0][1] and (tmp_path / "ov" / f"{first}.txt").is_file()
    # Scoring the saved predictions without a model gives the same report.
    again = tmp_path / "again.json"
    assert evaluate_main(["--predictions", str(saved), "--pairs", str(heldout), "--limit", str(n),
                          "--out", str(again)]) == 0
    assert json.loads(again.read_text())["per_task"] == rep["per_task"]


def test_evaluate_cli_bad_predictions_file(heldout, tmp_path, capsys):
    from calico_jax.inference.evaluate import main as evaluate_main
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "calico_jax.predictions",
                               "samples": [{"id": "x", "masks": [{"label": "a"}]}]}))
    out = tmp_path / "r.json"
    assert evaluate_main(["--predictions", str(bad), "--pairs", str(heldout), "--out", str(out)]) == 2
    assert "samples[0].masks[0] misses ['image', 'rle']" in capsys.readouterr().err
    assert not out.exists()
