"""End to end: a tiny CALICO assembled in PyTorch (tests/torch_calico.py: transformers InstructBLIP, DINOv2,
nn.MultiheadAttention, Linears, LlamaForCausalLM + LoRA, segment-anything, from the paper's equations) in the
first author's naming -> ``python -m convert calico`` -> calico_jax. On a teacher-forced two-image sequence the
image-token hidden states leaving each CAM layer, the logits and the [SEG] masks agree to max rel err 1e-5."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


from calico_jax.checkpoints.torch_files import open_checkpoint  # noqa: E402
from calico_jax.models.calico import Calico, CalicoConfig  # noqa: E402
from calico_jax.models.cam import CamConfig  # noqa: E402
from calico_jax.models.cem import CemConfig  # noqa: E402
from calico_jax.models.inputs import CalicoInputs  # noqa: E402
from convert import families  # noqa: E402
from convert.families.calico import TEXT_OFF  # noqa: E402
from convert.mapping import build_params  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from tests.torch_calico import IMAGE, TorchCalico  # noqa: E402

TOL = 1e-5


def test_torch_assembly_matches(tmp_path):
    from safetensors.numpy import save_file
    # The author layout: one q for the vision module and the CAMs (cam.queries="base"); every module random.
    cfg = CalicoConfig.tiny(cem=CemConfig(num_heads=4, zero_init_output=False),
                            cam=CamConfig(layers=(1, 3), queries="base", zero_init=False))
    ref = TorchCalico(cfg)
    (tmp_path / "src").mkdir()
    save_file(ref.state_dict(), tmp_path / "src" / "model.safetensors")
    (tmp_path / "settings.json").write_text(json.dumps({"config": cfg.to_dict()}))
    # the CLI's steps without writing OUT (the CLI itself is exercised in test_export_torch / test_convert_calico)
    plan = families.get("calico").plan(open_checkpoint(tmp_path / "src"), str(tmp_path / "settings.json"))
    assert plan.config == cfg
    assert plan.skipped == {TEXT_OFF.reason: 2}   # InstructBLIP's instruction embeddings: unused (text off)
    params = build_params(open_checkpoint(tmp_path / "src"), plan, np.float32, progress=False)

    seg, (i1, i2) = cfg.seg.token_id, cfg.seg.identifier_ids[:2]
    ids = [1, 7, IMAGE, 8, IMAGE, 9, 10, seg, *i1, 11, seg, *i2, 2]   # prompt = the first 6 tokens
    r = np.random.default_rng(0)
    blip = r.standard_normal((2, 3, 28, 28)).astype(np.float32)
    dino = r.standard_normal((2, 3, 28, 28)).astype(np.float32)
    sam = r.standard_normal((2, 3, 32, 32)).astype(np.float32)
    resized, original = np.array([[24, 32], [32, 24]]), np.array([[30, 40], [40, 30]])
    want = ref.forward(ids, *(torch.from_numpy(x) for x in (blip, dino, sam)), resized.tolist(), original.tolist(),
                       last_prompt=5, seg_images=[0, 1])

    nhwc = lambda x: jnp.asarray(x.transpose(0, 2, 3, 1))[None]  # noqa: E731
    module = Calico(cfg)

    def run(p):
        inputs = CalicoInputs(input_ids=jnp.asarray([ids], jnp.int32),
                              attention_mask=jnp.ones((1, len(ids)), jnp.int32), pixel_values=nhwc(blip),
                              dino_pixel_values=nhwc(dino), sam_pixel_values=nhwc(sam),
                              resized_hw=jnp.asarray(resized[None], jnp.int32),
                              mask_hw=jnp.asarray(original[None], jnp.int32), prompt_lengths=jnp.asarray([6]))
        return module.apply({"params": p}, inputs, capture_intermediates=True, mutable=["intermediates"])
    with jax.default_matmul_precision("highest"):
        out, inter = jax.jit(run)(params)
    pos = np.asarray(out["image_positions"][0]).reshape(-1)
    for layer in cfg.cam.layers:   # leaving decoder layer l, which read the CAM-updated T^l
        ours = inter["intermediates"]["llm"]["model"][f"layers_{layer}"]["__call__"][0][0][0]
        assert rel_err(np.asarray(ours)[pos], want["cam_hidden"][layer]) < TOL, layer
    assert rel_err(out["logits"][0], want["logits"]) < TOL
    assert np.asarray(out["seg_valid"][0]).tolist() == [True, True, False, False]
    for k, (h, w) in enumerate(original):
        assert rel_err(np.asarray(out["mask_logits"][0, k])[:h, :w], want["masks"][k]) < TOL, k
    # the CAMs matter on this input: without f_reintegration the reference's logits move well past the tolerance
    with torch.no_grad():
        for m in ref.reint:
            m.weight.zero_(), m.bias.zero_()
    no_cam = ref.forward(ids, *(torch.from_numpy(x) for x in (blip, dino, sam)), resized.tolist(), original.tolist(),
                         last_prompt=5, seg_images=[0, 1])
    assert rel_err(no_cam["logits"], want["logits"]) > 1e-3
