"""QFormer against HF Blip2QFormerModel and InstructBlipQFormerModel on tiny random configs."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from calico_jax.checkpoints.torch_files import open_checkpoint  # noqa: E402
from calico_jax.core.config import ConfigError  # noqa: E402
from calico_jax.models.qformer import QFormer, QFormerConfig  # noqa: E402
from convert.families.blip2 import component_plan  # noqa: E402
from convert.mapping import build_params  # noqa: E402
from tests.helpers import randomize, rel_err  # noqa: E402

# Odd head counts, cross-attention every 1st / 3rd layer, encoder width != hidden width.
CONFIGS = {
    "h24x3-freq3": dict(hidden_size=24, num_hidden_layers=4, num_attention_heads=3, intermediate_size=40,
                        cross_attention_frequency=3, encoder_hidden_size=36),
    "h30x5-freq1": dict(hidden_size=30, num_hidden_layers=2, num_attention_heads=5, intermediate_size=20,
                        cross_attention_frequency=1, encoder_hidden_size=16),
}
TEXT = dict(vocab_size=50, max_position_embeddings=12)


def hf_qformer(name, instruct, seed=0, **extra):
    if instruct:
        cfg = transformers.InstructBlipQFormerConfig(**CONFIGS[name], **TEXT, **extra)
        model = transformers.InstructBlipQFormerModel(cfg)
    else:
        model = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**CONFIGS[name], **extra))
    model.config._attn_implementation = "eager"
    randomize(model.eval(), seed=seed)
    return model


def convert(model, tmp_path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    plan = component_plan(ckpt, "qformer", QFormerConfig.from_hf_config(model.config))
    assert not plan.unexpected
    return plan.config, build_params(ckpt, plan, progress=False)


def inputs(cfg, batch=3, queries=4, image_tokens=7, text=0, seed=0):
    r = np.random.default_rng(seed)
    out = {"query_embeds": r.standard_normal((batch, queries, cfg.hidden_size)).astype(np.float32),
           "encoder_hidden_states":
               r.standard_normal((batch, image_tokens, cfg.encoder_hidden_size)).astype(np.float32)}
    if text:
        out["input_ids"] = r.integers(1, cfg.vocab_size, (batch, text))
        mask = np.ones((batch, text), np.int64)
        mask[1, text - 2:] = 0   # two padded rows of different lengths
        mask[2, 1:] = 0
        out["attention_mask"] = mask
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("text_ffn", [False, True], ids=["queries-only", "use_qformer_text_input"])
def test_blip2_qformer_parity(name, text_ffn, tmp_path):
    model = hf_qformer(name, instruct=False, use_qformer_text_input=text_ffn)
    cfg, params = convert(model, tmp_path)
    assert ("intermediate" in params["encoder"]["layer_0"]) == text_ffn
    assert [("crossattention" in params["encoder"][f"layer_{i}"]) for i in range(cfg.num_hidden_layers)] == [
        i % cfg.cross_attention_frequency == 0 for i in range(cfg.num_hidden_layers)]
    x = inputs(cfg)
    ref = model(query_embeds=torch.from_numpy(x["query_embeds"]),
                encoder_hidden_states=torch.from_numpy(x["encoder_hidden_states"])).last_hidden_state
    ours = jax.jit(QFormer(cfg).apply)({"params": params}, **x)
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_instructblip_qformer_parity_with_padded_text(name, tmp_path):
    model = hf_qformer(name, instruct=True)
    cfg, params = convert(model, tmp_path)
    assert cfg.text_embeddings and cfg.text_ffn and "layernorm" in params["embeddings"]
    x = inputs(cfg, text=5)
    q = x["query_embeds"].shape[1]
    full_mask = np.concatenate([np.ones((3, q), np.int64), x["attention_mask"]], axis=1)  # HF get_image_features
    ref = model(input_ids=torch.from_numpy(x["input_ids"]), attention_mask=torch.from_numpy(full_mask),
                query_embeds=torch.from_numpy(x["query_embeds"]),
                encoder_hidden_states=torch.from_numpy(x["encoder_hidden_states"])).last_hidden_state
    ours = jax.jit(QFormer(cfg).apply)({"params": params}, **x)
    assert ours.shape == tuple(ref.shape) == (3, q + 5, cfg.hidden_size)
    assert rel_err(ours[:, :q], ref[:, :q]) <= 1e-5      # query outputs (what the LLM sees)
    assert rel_err(ours, ref) <= 1e-5                    # every position, padded ones included
    # the mask matters: without it the padded rows' queries see the padding tokens
    unmasked = jax.jit(QFormer(cfg).apply)({"params": params}, **{k: v for k, v in x.items() if k != "attention_mask"})
    assert rel_err(unmasked[1:, :q], ref[1:, :q]) > 1e-3
    assert rel_err(unmasked[:1], ref[:1]) <= 1e-5        # the unpadded row is unaffected


def test_encoder_attention_mask(tmp_path):
    model = hf_qformer("h24x3-freq3", instruct=False)
    cfg, params = convert(model, tmp_path)
    x = inputs(cfg)
    image_mask = np.ones((3, 7), np.int64)
    image_mask[0, 4:] = 0
    ref = model(query_embeds=torch.from_numpy(x["query_embeds"]),
                encoder_hidden_states=torch.from_numpy(x["encoder_hidden_states"]),
                encoder_attention_mask=torch.from_numpy(image_mask)).last_hidden_state
    ours = jax.jit(QFormer(cfg).apply)({"params": params}, **x, encoder_attention_mask=image_mask)
    assert rel_err(ours, ref) <= 1e-5


def test_from_hf_config():
    b = QFormerConfig.from_hf_config(transformers.Blip2QFormerConfig(**CONFIGS["h24x3-freq3"]))
    assert (b.cross_attention_frequency, b.encoder_hidden_size, b.text_embeddings, b.text_ffn, b.layer_norm_eps) == (
        3, 36, False, False, 1e-12)
    i = QFormerConfig.from_hf_config(transformers.InstructBlipQFormerConfig(**CONFIGS["h30x5-freq1"], **TEXT).to_dict())
    assert (i.text_embeddings, i.text_ffn, i.vocab_size, i.max_position_embeddings, i.num_attention_heads) == (
        True, True, 50, 12, 5)
    with pytest.raises(ConfigError, match="unknown model_type 'bert'"):
        QFormerConfig.from_hf_config({"model_type": "bert", "hidden_size": 24})
    with pytest.raises(ConfigError, match="cross_attention_frequency"):
        QFormerConfig(cross_attention_frequency=0)
    lavis = QFormerConfig.from_lavis(vision_width=1408, cross_attention_freq=2, qformer_text_input=True)
    assert lavis.text_embeddings and lavis.vocab_size == 30523 and lavis.encoder_hidden_size == 1408


def test_text_without_text_path_is_an_error(tmp_path):
    model = hf_qformer("h30x5-freq1", instruct=False)
    cfg, params = convert(model, tmp_path)
    x = inputs(cfg)
    with pytest.raises(ValueError, match="without text embeddings"):
        jax.jit(QFormer(cfg).apply)({"params": params}, **x, input_ids=np.ones((3, 2), np.int32))
