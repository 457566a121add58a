"""The conversion framework on its own: lazy reading, safety, error reporting, atomic output, load()."""
import json
import os
import pickle
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from calico_jax import models  # noqa: E402
from calico_jax.checkpoints import converted as pretrained  # noqa: E402
from calico_jax.checkpoints.torch_files import CheckpointError, open_checkpoint  # noqa: E402
from calico_jax.core import fs  # noqa: E402
from calico_jax.core.config import ConfigError  # noqa: E402
from convert.mapping import Plan, Skip, apply_rules, build_params, flax_path  # noqa: E402
from tests.tiny_module import Tiny, TinyConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _register(monkeypatch):
    monkeypatch.setitem(models.REGISTRY, "tiny", ("tests.tiny_module", "Tiny", "TinyConfig"))


def state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"proj.weight": r(4, 2, 2, 2), "proj.bias": r(4), "norm.weight": 1 + r(4), "norm.bias": r(4),
            "fc.weight": r(3, 4), "fc.bias": r(3)}


def torch_forward(sd, x):
    h = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), sd["proj.weight"], sd["proj.bias"])
    h = torch.nn.functional.layer_norm(h.permute(0, 2, 3, 1), (4,), sd["norm.weight"], sd["norm.bias"], 1e-5)
    return (h @ sd["fc.weight"].T + sd["fc.bias"]).numpy()


def plan_for(ckpt, rules=((r"(.*)", r"\1"),)):
    tensors, unexpected, skipped = apply_rules(ckpt.keys(), list(rules))
    return Plan("tiny", TinyConfig(), tensors, unexpected, skipped)


def test_generic_rules_reproduce_torch(tmp_path):
    sd = state_dict()
    save_file(sd, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    params = build_params(ckpt, plan_for(ckpt), progress=False)
    x = np.random.default_rng(0).standard_normal((2, 3, 3, 2)).astype(np.float32)
    y = np.asarray(Tiny(TinyConfig()).apply({"params": params}, x))
    np.testing.assert_allclose(y, torch_forward(sd, x), rtol=1e-5, atol=1e-5)


def test_all_problems_in_one_message(tmp_path):
    sd = state_dict()
    sd["fc.weight"] = torch.zeros(3, 5)          # wrong shape
    sd["norm.bias_renamed"] = sd.pop("norm.bias")  # renamed key: one missing + one unexpected
    save_file(sd, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as e:
        build_params(ckpt, plan_for(ckpt), progress=False)
    msg = str(e.value)
    assert "1 missing key(s)" in msg and "norm.bias (flax norm/bias, shape (4,))" in msg
    assert "1 unexpected key(s)" in msg and "norm.bias_renamed" in msg
    assert "fc.weight (3, 5): expected (3, 4)" in msg


def test_skip_rules_are_counted(tmp_path):
    sd = state_dict()
    sd["lm.a"], sd["lm.b"] = torch.zeros(1), torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    plan = plan_for(ckpt, [(r"lm\..*", Skip("language model")), (r"(.*)", r"\1")])
    assert plan.skipped == {"language model": 2}
    build_params(ckpt, plan, progress=False)


def test_flax_path():
    assert flax_path("encoder.layers.12.mlp.fc1.weight") == (("encoder", "layers_12", "mlp", "fc1"), "weight")
    assert flax_path("neck.0.weight") == (("neck_0",), "weight")


def test_truncated_and_corrupt_safetensors(tmp_path):
    save_file(state_dict(), tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-7])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated file: tensor '.*' needs bytes"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors header"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        open_checkpoint(tmp_path)


def test_sharded_index_and_bf16(tmp_path):
    sd = state_dict()
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:3]}, tmp_path / "a.safetensors")
    save_file({k: sd[k].to(torch.bfloat16) for k in names[3:]}, tmp_path / "b.safetensors")
    index = {"weight_map": {k: ("a" if i < 3 else "b") + ".safetensors" for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = open_checkpoint(tmp_path)
    assert sorted(ckpt.keys()) == names
    bf = ckpt.get(names[4])
    assert str(bf.dtype) == "bfloat16"
    np.testing.assert_array_equal(bf.astype(np.float32), sd[names[4]].to(torch.bfloat16).float().numpy())
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"b\.safetensors: checkpoint file listed in the index is missing"):
        open_checkpoint(tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickles_load_weights_only(tmp_path, capsys):
    torch.save({"model": state_dict()}, tmp_path / "wrapped.pth")
    ckpt = open_checkpoint(tmp_path / "wrapped.pth")
    assert set(ckpt.keys()) == set(state_dict())
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pth: cannot read checkpoint"):
        open_checkpoint(evil)
    assert "code ran" not in capsys.readouterr().out
    (tmp_path / "trunc.pth").write_bytes((tmp_path / "wrapped.pth").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="trunc.pth: cannot read checkpoint"):
        open_checkpoint(tmp_path / "trunc.pth")


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        open_checkpoint(tmp_path)


def test_atomic_directory(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with fs.atomic_directory(out) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with fs.atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with fs.atomic_directory(out):
            pass
    with fs.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_takes_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert fs.current_umask() == 0o027
        with fs.atomic_directory(tmp_path / "a"):
            pass
        os.umask(0o002)
        with fs.atomic_directory(tmp_path / "b"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o750     # not mkdtemp's 0700
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o775


def test_save_load_roundtrip_and_mismatch(tmp_path):
    module = Tiny(TinyConfig())
    params = pretrained.init_params(module, seed=3)
    pretrained.save(tmp_path / "ck", "tiny", TinyConfig(), params)
    loaded_module, loaded, config = pretrained.load(tmp_path / "ck")
    assert config == TinyConfig()
    x = np.ones((1, 3, 3, 2), np.float32)
    np.testing.assert_array_equal(loaded_module.apply({"params": loaded}, x), module.apply({"params": params}, x))
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["config"]["out"] = 5
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match the tiny config"):
        pretrained.load(tmp_path / "ck")
    meta["config"]["bogus"] = 1
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['bogus'\]"):
        pretrained.load(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="not a calico_jax checkpoint"):
        pretrained.load(tmp_path)


def test_every_param_has_logical_axes():
    import flax.linen as nn
    boxed = pretrained.abstract_params(Tiny(TinyConfig()))
    leaves = [x for x in __import__("jax").tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))]
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)


def test_cli_user_error_is_one_line_no_traceback(tmp_path):
    """A real process: user errors end with one 'error:' line on stderr and exit code 2."""
    import subprocess
    import sys
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "convert", "hf-dinov2", "--src", str(tmp_path / "missing"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing'}: no such file or directory"
    assert not out.exists()


@pytest.fixture
def matmul_precision():
    """Sets the process-wide JAX matmul precision for one test and puts the previous value back."""
    import jax
    before = jax.config.jax_default_matmul_precision

    def set_to(value):
        jax.config.update("jax_default_matmul_precision", value)

    yield set_to
    set_to(before)


def test_verify_scopes_its_precision(matmul_precision):
    """verify.run: exact matmuls and no autograd inside, the caller's precision / grad mode / torch RNG after."""
    import jax

    from convert import verify

    seen = {}

    class Family:
        @staticmethod
        def verify(ckpt, plan, params):
            seen.update(precision=jax.config.jax_default_matmul_precision, grad=torch.is_grad_enabled(),
                        draw=torch.rand(()).item())
            x = np.arange(6, dtype=np.float32).reshape(2, 3)
            return [verify.compare("y", jax.jit(lambda a: a @ a.T)(x), torch.from_numpy(x) @ torch.from_numpy(x).T)]

    matmul_precision("bfloat16")
    torch.manual_seed(123)
    expected_next = torch.rand(()).item()
    torch.manual_seed(123)
    with torch.enable_grad():
        comparisons = verify.run(Family, None, None, None)
        assert torch.is_grad_enabled()
    assert jax.config.jax_default_matmul_precision == "bfloat16"
    assert torch.rand(()).item() == expected_next   # the seed inside did not reset the caller's stream
    assert seen["precision"] == "highest" and seen["grad"] is False
    torch.manual_seed(0)
    assert seen["draw"] == torch.rand(()).item()    # seeded with 0 inside
    assert [c.name for c in comparisons] == ["y"] and comparisons[0].max_rel == 0.0
