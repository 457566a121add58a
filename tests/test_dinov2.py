"""DINOv2 (𝓔): Flax module vs transformers Dinov2Model / Dinov2WithRegistersModel, the original-naming
converter, position-embedding interpolation in both modes, the CLI and its error paths."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

import calico_jax  # noqa: E402
from calico_jax.checkpoints.converted import abstract_params  # noqa: E402
from calico_jax.checkpoints.torch_files import open_checkpoint  # noqa: E402
from calico_jax.models.dinov2 import Dinov2, Dinov2Config, interpolate_pos_encoding  # noqa: E402
from convert.families.dinov2 import DINOV2, HF_DINOV2  # noqa: E402
from convert.mapping import build_params  # noqa: E402
from tests.helpers import nothing_at, randomize, rel_err, run_convert  # noqa: E402

TOL = 1e-5

# Tiny HF configs, each with non-default choices; image_size / patch_size = 4 (native 4x4 grid).
HF_CONFIGS = {
    "plain_odd_heads": ("dinov2", dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=56,
                                       patch_size=14)),
    "swiglu_no_qkv_bias": ("dinov2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                          patch_size=8, use_swiglu_ffn=True, mlp_ratio=3, qkv_bias=False,
                                          layer_norm_eps=1e-5)),
    "registers": ("dinov2_with_registers", dict(hidden_size=40, num_hidden_layers=3, num_attention_heads=5,
                                                image_size=40, patch_size=10, num_register_tokens=3)),
    "registers_swiglu": ("dinov2_with_registers", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                       image_size=24, patch_size=6, num_register_tokens=2,
                                                       use_swiglu_ffn=True)),
}


def hf_model(name: str, seed: int = 0):
    kind, kw = HF_CONFIGS[name]
    if kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    else:
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**kw))
    model.config._attn_implementation = "eager"
    randomize(model.eval(), seed=seed)  # LN, layer-scale, pos-embed, registers all random
    return model


def sizes(p: int, g: int = 4) -> list[tuple[int, int]]:
    """native; non-native non-square (down in H, up in W); same patch count but H != W (still resized)."""
    return [(g * p, g * p), (3 * p, 5 * p), (2 * p, 8 * p)]


def pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, h, w)).astype(np.float32)


def run_jax(module, params, x: np.ndarray, **kw):
    return module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), **kw)


def convert_dir(path, family=HF_DINOV2, config=None):
    ckpt = open_checkpoint(path)
    plan = family.plan(ckpt, config)
    return plan, build_params(ckpt, plan, progress=False)


# ------------------------------------------------------------------------------------ HF parity

@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hf_parity(name, tmp_path):
    model = hf_model(name)
    model.save_pretrained(tmp_path)
    plan, params = convert_dir(tmp_path)
    assert plan.config.interpolation == "hf"
    assert plan.config.interpolate_antialias == (HF_CONFIGS[name][0] == "dinov2_with_registers")
    module = plan.module()
    p = plan.config.patch_size
    for h, w in sizes(p):
        x = pixels(h, w)
        ref = model(pixel_values=torch.from_numpy(x), output_hidden_states=True)
        out = run_jax(module, params, x, output_hidden_states=True)
        n_tok = 1 + plan.config.num_register_tokens + (h // p) * (w // p)
        assert out["last_hidden_state"].shape == (2, n_tok, plan.config.hidden_size)
        assert rel_err(out["last_hidden_state"], ref.last_hidden_state) <= TOL, (h, w)
        assert rel_err(out["pooler_output"], ref.pooler_output) <= TOL, (h, w)
        assert len(out["hidden_states"]) == len(ref.hidden_states)
        assert rel_err(out["hidden_states"][1], ref.hidden_states[1]) <= TOL, (h, w)  # an intermediate layer


def test_hf_mask_token(tmp_path):
    model = hf_model("registers")
    model.save_pretrained(tmp_path)
    plan, params = convert_dir(tmp_path)
    x = pixels(40, 40)
    mask = np.random.default_rng(1).random((2, 16)) < 0.5
    ref = model(pixel_values=torch.from_numpy(x), bool_masked_pos=torch.from_numpy(mask)).last_hidden_state
    out = run_jax(plan.module(), params, x, bool_masked_pos=jnp.asarray(mask))["last_hidden_state"]
    assert rel_err(out, ref) <= TOL
    assert rel_err(run_jax(plan.module(), params, x)["last_hidden_state"], ref) > 1e-2  # the mask mattered


def test_hf_in_memory_names(tmp_path):
    """A file with transformers 5.x in-memory names (q_proj..., gate_proj/up_proj/down_proj) converts too."""
    from safetensors.torch import save_file

    model = hf_model("swiglu_no_qkv_bias", seed=4)
    state = model.state_dict()
    assert any(".mlp.gate_proj." in k for k in state) and any(".attention.q_proj." in k for k in state)
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    plan, params = convert_dir(tmp_path)
    x = pixels(40, 24)
    assert rel_err(run_jax(plan.module(), params, x)["last_hidden_state"],
                   model(pixel_values=torch.from_numpy(x)).last_hidden_state) <= TOL


# ------------------------------------------------------------------ original (facebookresearch) naming

def to_original(model, chunks: int = 0, layer_scale: bool = True) -> dict:
    """An HF model's weights under the original DinoVisionTransformer names (qkv fused, w12/w3, ls.gamma)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    depth = model.config.num_hidden_layers
    per_chunk = depth // chunks if chunks else depth
    out = {"cls_token": sd.pop("embeddings.cls_token"), "mask_token": sd.pop("embeddings.mask_token"),
           "pos_embed": sd.pop("embeddings.position_embeddings"),
           "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
           "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias"),
           "norm.weight": sd.pop("layernorm.weight"), "norm.bias": sd.pop("layernorm.bias")}
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd.pop("embeddings.register_tokens")
    for i in range(depth):
        h, o = f"encoder.layer.{i}.", f"blocks.{i // per_chunk}.{i}." if chunks else f"blocks.{i}."
        for leaf in ("weight", "bias"):
            parts = [sd.pop(f"{h}attention.{n}_proj.{leaf}", None) for n in "qkv"]
            if parts[0] is not None:
                out[f"{o}attn.qkv.{leaf}"] = torch.cat(parts, 0)
            out[f"{o}attn.proj.{leaf}"] = sd.pop(f"{h}attention.o_proj.{leaf}")
            for n in ("norm1", "norm2"):
                out[f"{o}{n}.{leaf}"] = sd.pop(f"{h}{n}.{leaf}")
            if f"{h}mlp.gate_proj.{leaf}" in sd:
                out[f"{o}mlp.w12.{leaf}"] = torch.cat([sd.pop(f"{h}mlp.gate_proj.{leaf}"),
                                                       sd.pop(f"{h}mlp.up_proj.{leaf}")], 0)
                out[f"{o}mlp.w3.{leaf}"] = sd.pop(f"{h}mlp.down_proj.{leaf}")
            else:
                for n in ("fc1", "fc2"):
                    out[f"{o}mlp.{n}.{leaf}"] = sd.pop(f"{h}mlp.{n}.{leaf}")
        for j in (1, 2):
            gamma = sd.pop(f"{h}layer_scale{j}.lambda1")
            if layer_scale:
                out[f"{o}ls{j}.gamma"] = gamma
    assert not sd, sorted(sd)
    return out


# (HF config, DinoVisionTransformer args besides the sizes, block_chunks, layer-scale)
ORIGINAL_CASES = {
    "hub_plain_offset": ("plain_odd_heads", dict(init_values=1.0, block_chunks=0), 0, True),
    "hub_reg_swiglu_chunked": ("registers_swiglu", dict(init_values=1.0, ffn_layer="swiglufused", num_register_tokens=2,
                                                        interpolate_antialias=True, interpolate_offset=0.0,
                                                        block_chunks=2), 2, True),
    "no_layerscale_aa_offset": ("registers", dict(num_register_tokens=3, interpolate_antialias=True,
                                                  interpolate_offset=0.1, block_chunks=0), 0, False),
}


def original_args(hf_name: str, extra: dict) -> dict:
    _, kw = HF_CONFIGS[hf_name]
    return dict(img_size=kw["image_size"], patch_size=kw["patch_size"], embed_dim=kw["hidden_size"],
                depth=kw["num_hidden_layers"], num_heads=kw["num_attention_heads"], mlp_ratio=kw.get("mlp_ratio", 4),
                **extra)


def original_fixture(case: str, seed: int = 2):
    hf_name, extra, chunks, ls = ORIGINAL_CASES[case]
    model = hf_model(hf_name, seed=seed)
    if not ls:  # init_values=None: the block has no layer-scale, i.e. lambda == 1
        for layer in model.encoder.layer:
            layer.layer_scale1.lambda1.data.fill_(1.0)
            layer.layer_scale2.lambda1.data.fill_(1.0)
    return model, to_original(model, chunks, ls), original_args(hf_name, extra)


def torch_original_pos(pos: torch.Tensor, h: int, w: int, p: int, offset: float, antialias: bool) -> torch.Tensor:
    """DinoVisionTransformer.interpolate_pos_encoding, written out (its w/h are our H/W)."""
    n = pos.shape[1] - 1
    if (h // p) * (w // p) == n and h == w:
        return pos
    m = int(n ** 0.5)
    kw = {"scale_factor": ((h // p + offset) / m, (w // p + offset) / m)} if offset else {"size": (h // p, w // p)}
    patch = F.interpolate(pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2), mode="bicubic",
                          antialias=antialias, **kw)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], 1)


@pytest.mark.parametrize("case", sorted(ORIGINAL_CASES))
def test_original_parity(case, tmp_path):
    """Converted original state dict vs the HF model carrying the same weights; at the native size the
    two references agree, off it the HF model's embeddings get the original interpolation."""
    from convert.families.dinov2 import patch_original_interpolation

    model, state, args = original_fixture(case)
    torch.save(state, tmp_path / "w.pth")
    (tmp_path / "arch.json").write_text(json.dumps(args))
    plan, params = convert_dir(tmp_path / "w.pth", DINOV2, str(tmp_path / "arch.json"))
    cfg = plan.config
    assert cfg.interpolation == "original" and cfg.use_layer_scale == ORIGINAL_CASES[case][3]
    module = plan.module()
    x = pixels(cfg.image_size, cfg.image_size)
    native = model(pixel_values=torch.from_numpy(x)).last_hidden_state
    assert rel_err(run_jax(module, params, x)["last_hidden_state"], native) <= TOL
    patch_original_interpolation(model, cfg)
    for h, w in sizes(cfg.patch_size)[1:]:
        x = pixels(h, w)
        assert rel_err(run_jax(module, params, x)["last_hidden_state"],
                       model(pixel_values=torch.from_numpy(x)).last_hidden_state) <= TOL, (h, w)


@pytest.mark.parametrize("mode,offset,antialias", [("hf", 0.0, False), ("hf", 0.0, True), ("original", 0.1, False),
                                                   ("original", 0.1, True), ("original", 0.0, True)])
def test_pos_interpolation(mode, offset, antialias):
    """Position table vs torch: HF's size= and the original's scale_factor=(g+off)/M, with/without antialias."""
    cfg = Dinov2Config(image_size=70, patch_size=10, hidden_size=6, num_hidden_layers=1, num_attention_heads=2,
                       interpolation=mode, interpolate_offset=offset, interpolate_antialias=antialias)
    pos = np.random.default_rng(0).standard_normal((1, 50, 6)).astype(np.float32)
    eff_offset = offset if mode == "original" else 0.0
    for h, w in [(70, 70), (30, 110), (50, 90), (140, 40), (10, 490)]:
        got = np.asarray(interpolate_pos_encoding(jnp.asarray(pos), h, w, cfg))
        ref = torch_original_pos(torch.from_numpy(pos), h, w, 10, eff_offset, antialias).numpy()
        assert got.shape == ref.shape == (1, 1 + (h // 10) * (w // 10), 6)
        # torch computes the scale_factor source coordinates in float32, we in float64: ~1e-6 apart
        assert rel_err(got, ref) <= 2e-6, (h, w, rel_err(got, ref))
    # the offset matters off the native grid, and even for a non-square input of the native patch count
    other = cfg.replace(interpolation="hf")
    if mode == "original" and offset:
        for h, w in [(30, 110), (10, 490)]:
            diff = np.abs(np.asarray(interpolate_pos_encoding(jnp.asarray(pos), h, w, cfg))
                          - np.asarray(interpolate_pos_encoding(jnp.asarray(pos), h, w, other))).max()
            assert diff > 1e-3, (h, w, diff)


# --------------------------------------------------------------------------------- configs / presets

@pytest.mark.parametrize("preset,tensors,elements", [("dinov2_vitb14", 175, 86_580_480),
                                                     ("dinov2_vitl14", 343, 304_368_640),
                                                     ("dinov2_vitg14", 567, 1_136_480_768)])
def test_presets_match_reference_sizes(preset, tensors, elements):
    """Full-size trees (abstract): element counts of the original models; tensors counted with fused qkv."""
    cfg = Dinov2Config.from_preset(preset)
    leaves = jax.tree.leaves(abstract_params(Dinov2(cfg)))
    assert sum(int(np.prod(x.shape)) for x in leaves) == elements
    assert len(leaves) - 4 * cfg.num_hidden_layers == tensors  # q,k,v (6 tensors) are one qkv (2) originally
    assert cfg.use_swiglu_ffn == (preset == "dinov2_vitg14")
    assert cfg.ffn_hidden_size == {"dinov2_vitb14": 3072, "dinov2_vitl14": 4096, "dinov2_vitg14": 4096}[preset]


def test_config_constructors():
    reg = Dinov2Config.from_preset("dinov2_vits14_reg")
    assert (reg.hidden_size, reg.num_register_tokens, reg.interpolate_antialias, reg.interpolate_offset,
            reg.image_size) == (384, 4, True, 0.0, 518)
    plain = Dinov2Config.from_original(embed_dim=64, depth=2, num_heads=4)  # constructor defaults otherwise
    assert (plain.patch_size, plain.use_layer_scale, plain.interpolate_offset) == (16, False, 0.1)
    hf = Dinov2Config.from_hf_config(json.loads(transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_attention_heads=4, num_register_tokens=2).to_json_string()))
    assert (hf.interpolation, hf.interpolate_antialias, hf.num_register_tokens, hf.patch_size) == ("hf", True, 2, 16)
    assert Dinov2Config.from_hf_config(transformers.Dinov2Config(hidden_size=32, num_attention_heads=4)) == \
        Dinov2Config(image_size=224, hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                     use_swiglu_ffn=False, interpolation="hf", interpolate_offset=0.0)
    assert Dinov2Config.from_dict(reg.to_dict()) == reg
    from calico_jax.core.config import ConfigError
    with pytest.raises(ConfigError, match="ffn_layer"):
        Dinov2Config.from_original(ffn_layer="identity")
    with pytest.raises(ConfigError, match="unknown argument"):
        Dinov2Config.from_original(embed_dims=64)


# ------------------------------------------------------------------------------------------------ CLI

def check_loaded(out, x: np.ndarray, ref: torch.Tensor):
    module, params, _ = calico_jax.load(out)
    got = jax.jit(module.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))["last_hidden_state"]
    assert rel_err(got, ref) <= TOL


def test_cli_hf_verify(tmp_path):
    model = hf_model("registers_swiglu", seed=5)
    model.save_pretrained(tmp_path / "src")
    rc, stdout, stderr = run_convert("hf-dinov2", "--src", tmp_path / "src", "--out", tmp_path / "out", "--verify")
    assert rc == 0, stderr
    assert "non-native" in stdout
    verdict = [ln for ln in stdout.splitlines() if ln.startswith("verify: max_rel_err=")]
    assert len(verdict) == 1 and verdict[0].endswith("PASS") and float(verdict[0].split("=")[1].split()[0]) <= TOL
    x = pixels(30, 18)
    check_loaded(tmp_path / "out", x, model(pixel_values=torch.from_numpy(x)).last_hidden_state)


def test_cli_original_verify(tmp_path):
    model, state, args = original_fixture("hub_plain_offset", seed=6)
    torch.save(state, tmp_path / "dinov2_tiny.pth")
    (tmp_path / "arch.json").write_text(json.dumps(args))
    rc, stdout, stderr = run_convert("dinov2", "--src", tmp_path / "dinov2_tiny.pth", "--out", tmp_path / "out",
                                     "--config", tmp_path / "arch.json", "--verify")
    assert rc == 0, stderr
    assert "non-native" in stdout and stdout.rstrip().splitlines()[-2].endswith("PASS")
    x = pixels(56, 56)
    check_loaded(tmp_path / "out", x, model(pixel_values=torch.from_numpy(x)).last_hidden_state)


# ------------------------------------------------------------------------------------ bad inputs

def _save_hf(tmp_path, edit) -> str:
    from safetensors.torch import load_file, save_file

    model = hf_model("plain_odd_heads")
    model.save_pretrained(tmp_path / "src")
    f = tmp_path / "src" / "model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f))
    return tmp_path / "src"


def _fails(tmp_path, *argv) -> str:
    rc, _, stderr = run_convert(*argv, "--out", tmp_path / "out")
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    assert nothing_at(tmp_path / "out")
    return stderr


def test_bad_renamed_key(tmp_path):
    key = "encoder.layer.1.attention.attention.key.weight"
    src = _save_hf(tmp_path, lambda s: s.__setitem__("encoder.layer.1.attention.attention.kee.weight", s.pop(key)))
    err = _fails(tmp_path, "hf-dinov2", "--src", src)
    assert "attention.attention.kee.weight" in err and "encoder.layer.1.attention.attention.key.weight" in err


def test_bad_shape(tmp_path):
    key = "encoder.layer.0.mlp.fc1.weight"
    src = _save_hf(tmp_path, lambda s: s.__setitem__(key, torch.zeros(190, 48)))
    err = _fails(tmp_path, "hf-dinov2", "--src", src)
    assert key in err and "(190, 48)" in err and "(192, 48)" in err


def test_bad_truncated(tmp_path):
    src = _save_hf(tmp_path, lambda s: None)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    err = _fails(tmp_path, "hf-dinov2", "--src", src)
    assert "model.safetensors" in err and "truncated" in err


def test_bad_original_inputs(tmp_path):
    _, state, args = original_fixture("hub_plain_offset")
    torch.save(state, tmp_path / "w.pth")
    err = _fails(tmp_path, "dinov2", "--src", tmp_path / "w.pth")
    assert "--config" in err and "dinov2_vitg14" in err
    (tmp_path / "wide.json").write_text(json.dumps({**args, "embed_dim": 64, "num_heads": 4}))
    err = _fails(tmp_path, "dinov2", "--src", tmp_path / "w.pth", "--config", tmp_path / "wide.json")
    assert "embed_dim: checkpoint has 48, --config gives 64" in err
    err = _fails(tmp_path, "dinov2", "--src", tmp_path / "w.pth", "--config", "dinov2_vitq14")
    assert "dinov2_vitq14" in err and "preset" in err
    bad = dict(state)
    bad["blocks.1.attn.qkv.weight"] = bad["blocks.1.attn.qkv.weight"][:-3]
    torch.save(bad, tmp_path / "bad.pth")
    (tmp_path / "arch.json").write_text(json.dumps(args))
    err = _fails(tmp_path, "dinov2", "--src", tmp_path / "bad.pth", "--config", tmp_path / "arch.json")
    assert "blocks.1.attn.qkv.weight (141, 48)" in err
