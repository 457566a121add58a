"""Blip2Vision end to end and the hf-blip2 / lavis-blip2 converters (CLI, --verify, bad inputs)."""
import json
import re
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import calico_jax  # noqa: E402
from calico_jax.checkpoints.torch_files import open_checkpoint  # noqa: E402
from convert.families.blip2 import HF_BLIP2, jax_image_features, random_inputs, torch_image_features  # noqa: E402
from convert.mapping import build_params  # noqa: E402
from tests.helpers import nothing_at, randomize, rel_err, run_convert  # noqa: E402

LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             vocab_size=64, max_position_embeddings=64)
VISION_A = dict(hidden_size=36, intermediate_size=50, num_hidden_layers=2, num_attention_heads=3, image_size=28,
                patch_size=7)
VISION_B = dict(hidden_size=40, intermediate_size=64, num_hidden_layers=3, num_attention_heads=5, image_size=24,
                patch_size=4, layer_norm_eps=1e-5)
PASS = re.compile(r"^verify: max_rel_err=\S+ \(tol 1e-05\) PASS$", re.M)


def hf_model(kind, seed=0):
    """Tiny random BLIP-2 (vision A, Q-Former 24/3 heads, cross-attn every 3rd layer) or InstructBLIP
    (vision B, Q-Former 30/5 heads, cross-attn every layer, instruction text), with a tiny LLaMA."""
    if kind == "blip2":
        cfg = transformers.Blip2Config(
            vision_config=VISION_A, text_config=LLAMA, num_query_tokens=5,
            qformer_config=dict(hidden_size=24, num_hidden_layers=4, num_attention_heads=3, intermediate_size=40,
                                cross_attention_frequency=3))
        model = transformers.Blip2ForConditionalGeneration(cfg)
    else:
        cfg = transformers.InstructBlipConfig(
            vision_config=VISION_B, text_config=LLAMA, num_query_tokens=3,
            qformer_config=dict(hidden_size=30, num_hidden_layers=2, num_attention_heads=5, intermediate_size=20,
                                cross_attention_frequency=1, vocab_size=50, max_position_embeddings=16))
        model = transformers.InstructBlipForConditionalGeneration(cfg)
    model.config._attn_implementation = "eager"
    randomize(model.eval(), seed=seed)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (torch model, save_pretrained directory)."""
    out = {}
    for kind in ("blip2", "instructblip"):
        model = hf_model(kind)
        path = tmp_path_factory.mktemp(kind) / "hf"
        model.save_pretrained(path)
        out[kind] = (model, path)
    return out


def copy_dir(saved_path, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(saved_path, dst)
    return dst


def check_outputs(ours, ref, tol=1e-5):
    errs = {k: rel_err(ours[k], ref[k]) for k in ("vision", "query_output", "image_tokens")}
    assert all(e <= tol for e in errs.values()), errs
    return errs


# ---- the model end to end ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["blip2", "instructblip"])
def test_blip2_vision_matches_get_image_features_at_other_resolution(kind, saved):
    model, path = saved[kind]
    ckpt = open_checkpoint(path)
    plan = HF_BLIP2.plan(ckpt, None)
    params = build_params(ckpt, plan, progress=False)
    cfg = plan.config
    size = cfg.vision.image_size + 2 * cfg.vision.patch_size  # position table interpolated
    x = random_inputs(cfg, batch=3, size=size, seed=3)
    ours, ref = jax_image_features(cfg, params, x), torch_image_features(model, cfg, x)
    assert ours["image_tokens"].shape == (3, cfg.num_query_tokens, LLAMA["hidden_size"])
    check_outputs(ours, ref)


# ---- hf-blip2 CLI -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["blip2", "instructblip"])
def test_cli_hf_blip2_verify_and_load(kind, saved, tmp_path):
    model, path = saved[kind]
    out = tmp_path / "out"
    rc, stdout, stderr = run_convert("hf-blip2", "--src", path, "--out", out, "--verify")
    assert rc == 0, stderr
    assert PASS.search(stdout), stdout
    assert "hf-llama family" in stdout and "skipped 12 key(s)" in stdout  # the LLaMA's 12 tensors
    module, params, config = calico_jax.load(out)
    assert config.qformer.text_embeddings == (kind == "instructblip")
    x = random_inputs(config, batch=2, seed=7)
    ours = jax.jit(module.apply)({"params": params}, x["pixel_values"].transpose(0, 2, 3, 1),
                        **{k: x[k] for k in ("input_ids", "attention_mask") if k in x})
    check_outputs(ours, torch_image_features(model, config, x))


def test_cli_hf_blip2_bf16_output(saved, tmp_path):
    rc, stdout, stderr = run_convert("hf-blip2", "--src", saved["blip2"][1], "--out", tmp_path / "o",
                                     "--dtype", "bfloat16")
    assert rc == 0, stderr
    _, params, _ = calico_jax.load(tmp_path / "o")
    assert params["query_tokens"].dtype.name == "bfloat16"


def rewrite(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_hf_blip2_renamed_key(saved, tmp_path):
    src = copy_dir(saved["blip2"][1], tmp_path)
    old = "qformer.encoder.layer.3.output_query.dense.weight"
    rewrite(src, lambda t: t.update({old.replace("dense", "dense_renamed"): t.pop(old)}))
    rc, _, err = run_convert("hf-blip2", "--src", src, "--out", tmp_path / "out")
    assert rc == 2
    assert "missing" in err and old in err and "dense_renamed" in err and "unexpected" in err
    assert "Traceback" not in err and nothing_at(tmp_path / "out")


def test_hf_blip2_wrong_shape(saved, tmp_path):
    src = copy_dir(saved["instructblip"][1], tmp_path)
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    rewrite(src, lambda t: t.update({key: torch.zeros(65, 40)}))
    rc, _, err = run_convert("hf-blip2", "--src", src, "--out", tmp_path / "out", "--verify")
    assert rc == 2
    assert key in err and "(65, 40)" in err and "(64, 40)" in err
    assert nothing_at(tmp_path / "out")


def test_hf_blip2_truncated_file(saved, tmp_path):
    src = copy_dir(saved["blip2"][1], tmp_path)
    file = src / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    rc, _, err = run_convert("hf-blip2", "--src", src, "--out", tmp_path / "out")
    assert rc == 2 and "model.safetensors" in err and "truncated" in err
    assert nothing_at(tmp_path / "out")


@pytest.mark.parametrize("field,value,expect", [
    ("model_type", "instructblip_video", "model_type 'instructblip_video'"),
    ("qformer_config.model_type", "bert", "qformer_config.model_type 'bert'"),
])
def test_hf_blip2_unknown_model_type(field, value, expect, saved, tmp_path):
    src = copy_dir(saved["instructblip"][1], tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    node = cfg
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    (src / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_convert("hf-blip2", "--src", src, "--out", tmp_path / "out")
    assert rc == 2 and expect in err and "config.json" in err and "Traceback" not in err
    assert nothing_at(tmp_path / "out")


# ---- lavis-blip2 ------------------------------------------------------------------------------------

def hf_to_lavis(sd, instruct):
    """The inverse of transformers' LAVIS -> HF conversion, for building LAVIS-named fixtures."""
    proj, llm = ("llm_proj", "llm_model") if instruct else ("opt_proj", "opt_model")
    out = {}
    layer = r"^vision_model\.encoder\.layers\.(\d+)\."
    for k, v in sd.items():
        k2 = k
        for a, b in [(r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
                     (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
                     (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
                     (r"^vision_model\.post_layernorm\.", "ln_vision."),
                     (layer + r"layer_norm(\d)\.", r"visual_encoder.blocks.\1.norm\2."),
                     (layer + r"self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
                     (layer + r"self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
                     (layer + r"mlp\.", r"visual_encoder.blocks.\1.mlp."),
                     (r"^qformer\.(embeddings\.)?layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
                     (r"^qformer\.encoder\.layer\.(\d+)\.(cross)?attention\.attention\.",
                      r"Qformer.bert.encoder.layer.\1.\2attention.self."),
                     (r"^qformer\.", "Qformer.bert."),
                     (r"^language_projection\.", proj + "."),
                     (r"^language_model\.", llm + ".")]:
            k2, n = re.subn(a, b, k2)
            if n:
                break
        if k2.endswith("attn.qkv.bias"):
            d = v.shape[0] // 3
            out[k2.replace("qkv.bias", "q_bias")] = v[:d].clone()
            out[k2.replace("qkv.bias", "v_bias")] = v[2 * d:].clone()
        else:
            out[k2] = v.contiguous()
    if instruct:
        out["Qformer.bert.embeddings.position_ids"] = torch.arange(16)[None]
    return out


def lavis_reference(model, config, x):
    """LAVIS's ln_vision is a plain nn.LayerNorm (eps 1e-5)."""
    model.vision_model.post_layernorm.eps = 1e-5
    try:
        return torch_image_features(model, config, x)
    finally:
        model.vision_model.post_layernorm.eps = model.config.vision_config.layer_norm_eps


@pytest.mark.parametrize("kind", ["blip2", "instructblip"])
def test_cli_lavis_verify_and_load(kind, saved, tmp_path):
    model, _ = saved[kind]
    instruct = kind == "instructblip"
    sd = hf_to_lavis(model.state_dict(), instruct)
    src = tmp_path / "ckpt"
    if instruct:  # .pth in LAVIS's {"model": ...} wrapper; only the head counts given, the rest inferred
        src = src.with_suffix(".pth")
        torch.save({"model": sd}, src)
        arch = {"vision": {"num_heads": 5, "layer_norm_eps": 1e-5}, "qformer": {"num_attention_heads": 5}}
    else:  # safetensors, full constructor arguments, plus an extra ViT block beyond depth (as eva_vit_g.pth has)
        src = src.with_suffix(".safetensors")
        for k in [k for k in sd if k.startswith("visual_encoder.blocks.1.")]:
            sd[k.replace("blocks.1.", "blocks.2.")] = sd[k].clone()
        save_file(sd, src)
        arch = {"vision": {"img_size": 28, "patch_size": 7, "embed_dim": 36, "depth": 2, "num_heads": 3,
                           "mlp_ratio": 50 / 36, "qkv_bias": True},
                "qformer": {"num_query_token": 5, "cross_attention_freq": 3, "qformer_text_input": False,
                            "hidden_size": 24, "num_hidden_layers": 4, "num_attention_heads": 3,
                            "intermediate_size": 40},
                "llm_hidden_size": 32}
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    out = tmp_path / "out"
    rc, stdout, stderr = run_convert("lavis-blip2", "--src", src, "--out", out, "--config", tmp_path / "arch.json",
                                     "--verify")
    assert rc == 0, stderr
    assert PASS.search(stdout), stdout
    assert "hf-llama family" in stdout
    if instruct:
        assert "inferred from tensor shapes" in stdout and "qformer.cross_attention_freq=1" in stdout
        assert "position_ids buffer" in stdout
    else:
        assert "beyond the configured depth" in stdout
    module, params, config = calico_jax.load(out)
    assert config.vision.post_layernorm_eps == 1e-5
    x = random_inputs(config, batch=2, seed=5)
    ours = jax.jit(module.apply)({"params": params}, x["pixel_values"].transpose(0, 2, 3, 1),
                        **{k: x[k] for k in ("input_ids", "attention_mask") if k in x})
    check_outputs(ours, lavis_reference(model, config, x))


@pytest.fixture
def lavis_file(saved, tmp_path):
    sd = hf_to_lavis(saved["blip2"][0].state_dict(), instruct=False)
    return sd, tmp_path / "blip2.safetensors"



def lavis_run(src, tmp_path, arch=None):
    args = ["lavis-blip2", "--src", src, "--out", tmp_path / "out"]
    if arch is not None:
        if isinstance(arch, dict):
            (tmp_path / "arch.json").write_text(json.dumps(arch))
            arch = tmp_path / "arch.json"
        args += ["--config", arch]
    rc, _, err = run_convert(*args)
    assert "Traceback" not in err and nothing_at(tmp_path / "out")
    return rc, err


HEAD_ARCH = {"vision": {"num_heads": 3}, "qformer": {"num_attention_heads": 3}}


def test_lavis_renamed_key(lavis_file, tmp_path):
    sd, src = lavis_file
    sd["visual_encoder.blocks.0.attn.proj_x.weight"] = sd.pop("visual_encoder.blocks.0.attn.proj.weight")
    save_file(sd, src)
    rc, err = lavis_run(src, tmp_path, HEAD_ARCH)
    assert rc == 2 and "visual_encoder.blocks.0.attn.proj_x.weight" in err
    assert "vision_model.encoder.layers.0.self_attn.projection.weight" in err  # the missing parameter


def test_lavis_wrong_shape(lavis_file, tmp_path):
    sd, src = lavis_file
    sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"] = torch.zeros(24, 35)
    save_file(sd, src)
    rc, err = lavis_run(src, tmp_path, HEAD_ARCH)
    assert rc == 2 and "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in err
    assert "(24, 35)" in err and "(24, 36)" in err


def test_lavis_truncated_pth(lavis_file, tmp_path):
    sd, _ = lavis_file
    src = tmp_path / "blip2.pth"
    torch.save({"model": sd}, src)
    src.write_bytes(src.read_bytes()[:2000])
    rc, err = lavis_run(src, tmp_path, HEAD_ARCH)
    assert rc == 2 and "blip2.pth" in err and "truncated" in err


def test_lavis_config_errors(lavis_file, tmp_path):
    sd, src = lavis_file
    save_file(sd, src)
    rc, err = lavis_run(src, tmp_path)                            # no --config: head counts unknown
    assert rc == 2 and "vision.num_heads cannot be inferred" in err
    rc, err = lavis_run(src, tmp_path, {"vision": {"num_heads": 3, "heads": 3}})
    assert rc == 2 and "unknown vision field(s) ['heads']" in err
    rc, err = lavis_run(src, tmp_path, "instructblip-vicuna7b")  # a real preset on a tiny file: shapes differ
    assert rc == 2 and "missing key(s)" in err and "shape mismatch" in err
    assert re.search(r"\(\d+, \d+\): expected \((768|1408|4096),", err), err
    rc, err = lavis_run(src, tmp_path, "no-such-preset")
    assert rc == 2 and "neither a preset" in err
    del sd["query_tokens"]
    save_file(sd, src)
    rc, err = lavis_run(src, tmp_path, HEAD_ARCH)
    assert rc == 2 and "cannot infer qformer.hidden_size" in err and "'query_tokens'" in err


def test_full_size_matches_hf_parameter_count():
    """Default config (InstructBLIP Vicuna-7B front end) vs the HF model built on the meta device:
    the same tensors, less the 39 constant-zero K-bias thirds of the fused qkv bias."""
    import flax.linen as nn

    from calico_jax.checkpoints.converted import abstract_params
    from calico_jax.models.blip2 import Blip2Vision, Blip2VisionConfig

    full = nn.unbox(abstract_params(Blip2Vision(Blip2VisionConfig())))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(full))
    cfg = transformers.InstructBlipConfig(
        qformer_config=dict(vocab_size=30523),
        text_config=dict(model_type="llama", hidden_size=4096, num_hidden_layers=0, intermediate_size=8,
                         num_attention_heads=32, vocab_size=8))
    with torch.device("meta"):
        model = transformers.InstructBlipForConditionalGeneration(cfg)
    hf = sum(t.numel() for k, t in model.state_dict().items() if not k.startswith("language_model."))
    assert hf - ours == 39 * 1408
