"""``python -m convert calico-assemble``: tiny InstructBLIP (hf-blip2), DINOv2 with registers (hf-dinov2)
and GLaMM (glamm) parts converted through the CLI, assembled into one CALICO checkpoint, reloaded and
run; part tensors bit-exact, new modules initialised per config, and every mismatch reported."""
from __future__ import annotations

import json
import re

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import calico_jax  # noqa: E402
from calico_jax.models.calico import Calico  # noqa: E402
from tests.helpers import assert_bit_equal_reload, flat, nothing_at, run_convert  # noqa: E402
from tests.test_convert_blip2 import hf_model as blip2_model  # noqa: E402
from tests.test_convert_glamm import glamm_checkpoint  # noqa: E402
from tests.test_dinov2 import hf_model as dinov2_model  # noqa: E402

# InstructBLIP vision B is 40 wide (CEM heads must divide it), the GLaMM "glamm" LLM has 2 layers.
OVERRIDES = {"cem": {"num_heads": 4}, "cam": {"layers": [0, 1]},
             "preprocess": {"dinov2_size": 40, "dinov2_crop": 40, "mask_size": 40},
             "seg": {"identifier_ids": [[61, 62], [61, 63]], "max_seg": 2}}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    blip2_model("instructblip").save_pretrained(root / "blip2_hf")
    dinov2_model("registers").save_pretrained(root / "dinov2_hf")
    glamm_checkpoint(root / "glamm_hf", "glamm")
    glamm_checkpoint(root / "lisa_hf", "lisa")
    runs = [("hf-blip2", "blip2_hf", "blip2", ()), ("hf-dinov2", "dinov2_hf", "dinov2", ()),
            ("glamm", "glamm_hf", "glamm", ("--config", root / "glamm_hf" / "sam_args.json")),
            ("glamm", "lisa_hf", "lisa", ("--config", root / "lisa_hf" / "sam_args.json"))]
    for family, src, out, extra in runs:
        rc, _, err = run_convert(family, "--src", root / src, "--out", root / out, *extra)
        assert rc == 0, err
    return root


def assemble(parts, tmp_path, overrides=OVERRIDES, llm="glamm", dinov2=True, *extra):
    args = ["calico-assemble", "--blip2", parts / "blip2", "--llm", parts / llm, "--out", tmp_path / "calico"]
    if dinov2:
        args += ["--dinov2", parts / "dinov2"]
    if overrides is not None:
        (tmp_path / "overrides.json").write_text(json.dumps(overrides))
        args += ["--config", tmp_path / "overrides.json"]
    return run_convert(*args, *extra)


def test_assemble_load_forward(parts, tmp_path):
    rc, out, err = assemble(parts, tmp_path)
    assert rc == 0, err
    assert "skipped 2 tensor(s): Q-Former instruction embeddings" in out
    module, params, cfg = calico_jax.load(tmp_path / "calico")
    assert isinstance(module, Calico) and cfg.cam.layers == (0, 1) and cfg.cem.num_heads == 4
    # the LLM part's tokenizer travels along (predict/evaluate read OUT/tokenizer)
    assert sorted(p.name for p in (tmp_path / "calico" / "tokenizer").iterdir()) == sorted(
        p.name for p in (parts / "glamm" / "tokenizer").iterdir())
    ours = flat(params)

    # every part tensor carried over bit for bit
    carried = 0
    for part, prefix in (("blip2", ""), ("dinov2", "dinov2/"), ("glamm", "")):
        _, p, _ = calico_jax.load(parts / part)
        for k, v in flat(p).items():
            if prefix + k not in ours:   # only InstructBLIP's instruction-text embeddings are dropped
                assert k in ("qformer/embeddings/word_embeddings/embedding",
                             "qformer/embeddings/position_embeddings/embedding"), k
                continue
            np.testing.assert_array_equal(ours[prefix + k], v, err_msg=k)
            carried += 1
    assert carried > 100
    _, glamm_params, glamm_cfg = calico_jax.load(parts / "glamm")
    assert cfg.llm.vocab_size == glamm_cfg.llm.vocab_size and cfg.seg.token_id == glamm_cfg.seg_token_id
    assert cfg.seg.projection == "mlp" and cfg.llm.lora is not None

    # new modules per config: CEM out_proj, CAMs and lora_b zero; CEM q/k/v and lora_a random;
    # the CAM queries a copy of the Q-Former's queries
    for k, v in ours.items():
        if k.startswith(("cem/out_proj/", "cam_0/", "cam_1/")) or k.endswith("lora_b"):
            assert not np.any(v), k
        if k.startswith("cem/q_proj/kernel") or k.endswith("lora_a"):
            assert np.std(v) > 0, k
    assert sum(k.endswith("lora_b") for k in ours) == 2 * cfg.llm.num_hidden_layers
    np.testing.assert_array_equal(ours["cam_query_tokens"], ours["query_tokens"])

    # forward: finite; the BOS position (before any image token, causal) sees only the LLM, so its
    # logits equal the GLaMM LLM's (LoRA B = 0)
    inputs = module.dummy_inputs()
    res = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, inputs)
    assert np.all(np.isfinite(np.asarray(res["logits"]))) and np.all(np.isfinite(np.asarray(res["mask_logits"])))
    from calico_jax.models.glamm_parts import GlammParts
    bos = inputs.input_ids[:, :1]
    want = GlammParts(glamm_cfg).apply({"params": glamm_params}, bos, jnp.ones_like(bos),
                                       method=lambda m, i, a: m.llm(i, a)).logits
    np.testing.assert_allclose(np.asarray(res["logits"])[:, 0], np.asarray(want)[:, 0], rtol=1e-5, atol=1e-6)


def test_no_cem_needs_no_dinov2(parts, tmp_path):
    rc, out, err = assemble(parts, tmp_path, {**OVERRIDES, "cem": {"enabled": False}}, "glamm", False)
    assert rc == 0, err
    _, params, cfg = calico_jax.load(tmp_path / "calico")
    assert "dinov2" not in params and "cem" not in params and not cfg.cem.enabled


@pytest.mark.parametrize("case", ["default_cem_heads", "llm_width", "changed_part", "no_dinov2", "wrong_kind"])
def test_mismatches_reported(case, parts, tmp_path):
    if case == "default_cem_heads":      # 16 heads do not divide the 40-wide EVA
        rc, _, err = assemble(parts, tmp_path, {k: v for k, v in OVERRIDES.items() if k != "cem"})
        expect = ["cem.num_heads 16", "40"]
    elif case == "llm_width":            # LISA LLM is 36 wide, the BLIP-2 projection gives 32
        rc, _, err = assemble(parts, tmp_path, llm="lisa")
        expect = ["text_hidden_size 32", "llm.hidden_size 36"]
    elif case == "changed_part":
        rc, _, err = assemble(parts, tmp_path, {**OVERRIDES, "llm": {"rms_norm_eps": 1e-3},
                                                "sam": {"image_encoder": {"depth": 2}}})
        expect = ["llm.rms_norm_eps: the part has 1e-06, --config sets 0.001", "sam.image_encoder"]
    elif case == "no_dinov2":
        rc, _, err = assemble(parts, tmp_path, dinov2=False)
        expect = ["missing", "dinov2/embeddings/cls_token", "pass --dinov2"]
    else:
        rc, _, err = run_convert("calico-assemble", "--blip2", parts / "dinov2", "--llm", parts / "glamm",
                                 "--out", tmp_path / "calico")
        expect = ["--blip2", "'dinov2' checkpoint", "'blip2_vision'"]
    assert rc == 2, err
    for e in expect:
        assert e in err, (e, err)
    assert nothing_at(tmp_path / "calico")


# ---------------------------------------------------------------- the calico family (guessed official layout)
def _torch_name(path: str) -> str:
    """Flax path -> PyTorch-style name (``layers_3`` -> ``layers.3``; kernel/scale/embedding -> weight)."""
    *parents, leaf = path.split("/")
    parents = [p if p.startswith("cam_") else re.sub(r"_(\d+)$", r".\1", p) for p in parents]
    return ".".join(parents + ["weight" if leaf in ("kernel", "scale", "embedding") else leaf])


def _torch_value(path: str, v: np.ndarray) -> np.ndarray:
    if path.endswith("kernel") and v.ndim == 2:
        return v.T
    if path.endswith("kernel") and v.ndim == 4:
        return v.transpose(3, 2, 0, 1)
    return v


def official_state(params, cam_layers) -> dict[str, np.ndarray]:
    """A guessed official CALICO state dict: PEFT-wrapped GLaMM names, BLIP-2 under model.blip2 with fused
    qkv bias, DINOv2 under model.dinov2, nn.MultiheadAttention-style CEM, CAMs as a ModuleList."""
    f = flat(params)
    cam_index = {layer: i for i, layer in enumerate(cam_layers)}   # cams.i = the i-th of config.cam.layers
    out, root = {}, "base_model.model."
    for path, v in f.items():
        top, rest = path.split("/", 1) if "/" in path else (path, "")
        if top == "llm":
            name = _torch_name(rest)
            if path.endswith(("lora_a", "lora_b")):
                name = name.replace(".lora_a", ".lora_A.default.weight").replace(".lora_b", ".lora_B.default.weight")
                out[root + name] = v.T
                continue
            if any(f"{path.rsplit('/', 1)[0]}/lora_a" == k for k in f):
                name = name.replace(".weight", ".base_layer.weight")
            out[root + name] = _torch_value(path, v)
        elif top == "sam":
            out[root + "model.grounding_encoder." + _torch_name(rest)] = _torch_value(path, v)
        elif top.startswith("text_hidden_fcs_0_"):
            out[root + f"model.text_hidden_fcs.0.{top[-1]}.{_torch_name(rest)}"] = _torch_value(path, v)
        elif top == "dinov2":
            out[root + "model.dinov2." + _torch_name(rest)] = _torch_value(path, v)
        elif top == "cem":
            proj, leaf = rest.split("/")
            if proj == "out_proj" or leaf == "kernel":
                name = f"out_proj.{'weight' if leaf == 'kernel' else leaf}" if proj == "out_proj" else f"{proj}_weight"
                out[root + "model.cem.attn." + name] = _torch_value(path, v)
        elif top.startswith("cam_") and top != "cam_query_tokens":
            out[root + f"model.cams.{cam_index[int(top[4:])]}.{_torch_name(rest)}"] = _torch_value(path, v)
        elif top == "cam_query_tokens":
            out[root + "model.new_query_tokens"] = v
        elif path.endswith("self_attn/q_bias"):
            v_bias = f[path[:-len("q_bias")] + "v_bias"]
            out[root + "model.blip2." + _torch_name(path)[:-len("q_bias")] + "qkv.bias"] = np.concatenate(
                [v, np.zeros_like(v), v_bias])
        elif not path.endswith("self_attn/v_bias"):
            out[root + "model.blip2." + _torch_name(path)] = _torch_value(path, v)
    out[root + "model.cem.attn.in_proj_bias"] = np.concatenate([f[f"cem/{p}/bias"]
                                                                for p in ("q_proj", "k_proj", "v_proj")])
    out[root + "model.mm_projector.0.weight"] = np.ones((4, 4), np.float32)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    from safetensors.numpy import save_file

    from calico_jax.models.calico import CalicoConfig
    from calico_jax.models.cam import CamConfig
    from calico_jax.models.cem import CemConfig
    from calico_jax.models.sam import SamConfig
    from tests.test_sam import CONFIG_A

    sam = SamConfig.from_original(CONFIG_A)
    cfg = CalicoConfig.tiny(sam=sam, cem=CemConfig(num_heads=4, zero_init_output=False),
                            cam=CamConfig(layers=(3, 1), zero_init=False),
                            preprocess=CalicoConfig.tiny().preprocess.replace(sam_size=sam.image_encoder.img_size))
    module = Calico(cfg)   # jitted init: op-by-op init of the whole model is slow on CPU
    params = jax.jit(lambda k: flax.linen.unbox(module.init(k, module.dummy_inputs())["params"]))(jax.random.key(3))
    params = jax.tree.map(np.asarray, params)
    g = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(   # trained LoRA: B != 0
        lambda p, v: g.normal(0, 0.05, v.shape).astype(np.float32) if p[-1].key == "lora_b" else v, params)
    root = tmp_path_factory.mktemp("official")
    save_file(official_state(params, cfg.cam.layers), root / "calico.safetensors")
    (root / "settings.json").write_text(json.dumps({"config": cfg.to_dict()}))
    return root, cfg, params


def test_calico_family_guessed_layout(official, tmp_path):
    root, cfg, params = official
    out = tmp_path / "out"
    rc, stdout, err = run_convert("calico", "--src", root / "calico.safetensors", "--config", root / "settings.json",
                                  "--out", out, "--verify")
    assert rc == 0, err
    assert re.search(r"^verify: max_rel_err=\S+ \(tol 1e-05\) PASS$", stdout, re.M), stdout
    assert "skipped 1 key(s): LLaVA mm_projector" in stdout
    assert_bit_equal_reload(out, cfg, params)


def test_calico_family_unmatched_keys_and_patterns(official, tmp_path):
    from safetensors.numpy import load_file, save_file
    root, cfg, params = official
    state = load_file(root / "calico.safetensors")
    for leaf in ("weight", "bias"):   # an unguessed CAM name
        for i in (0, 1):
            state[f"base_model.model.model.cam_layers.{i}.fa.{leaf}"] = state.pop(
                f"base_model.model.model.cams.{i}.f_adaptation.{leaf}")
    save_file(state, tmp_path / "calico.safetensors")
    rc, _, err = run_convert("calico", "--src", tmp_path / "calico.safetensors", "--config", root / "settings.json",
                             "--out", tmp_path / "out")
    assert rc == 2 and nothing_at(tmp_path / "out")
    assert "4 key(s) match no pattern" in err and "base_model.model.model.cam_layers.1.fa.bias" in err
    assert '"patterns"' in err
    settings = json.loads((root / "settings.json").read_text())
    settings["patterns"] = [[r"model\.cam_layers\.(\d+)\.fa\.(weight|bias)", r"<cam:\1>.f_adaptation.\2"]]
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    rc, _, err = run_convert("calico", "--src", tmp_path / "calico.safetensors", "--config",
                             tmp_path / "settings.json", "--out", tmp_path / "out")
    assert rc == 0, err
    _, loaded, _ = calico_jax.load(tmp_path / "out")
    for layer in (3, 1):   # cams.0 is the first of cam.layers (3), cams.1 the second (1)
        np.testing.assert_array_equal(np.asarray(loaded[f"cam_{layer}"]["f_adaptation"]["kernel"]),
                                      params[f"cam_{layer}"]["f_adaptation"]["kernel"])
    assert np.any(params["cam_3"]["f_adaptation"]["kernel"] != params["cam_1"]["f_adaptation"]["kernel"])
