"""``CalicoConfig.qformer_text_input`` (InstructBLIP's instruction text into the Q-Former of Eq. 2), off by default:
the on path vs transformers' InstructBLIP on a tiny config, its tokenizer, and the training task's batch."""
from __future__ import annotations

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from calico_jax.checkpoints import author_layout  # noqa: E402
from calico_jax.checkpoints import converted as pretrained  # noqa: E402
from calico_jax.data.qformer_text import QFormerText, build_tiny_qformer_tokenizer, load_qformer_tokenizer  # noqa: E402
from calico_jax.models.calico import Calico, CalicoConfig  # noqa: E402
from calico_jax.models.inputs import CalicoInputs, as_dict, spec  # noqa: E402
from tests.helpers import rel_err  # noqa: E402


def text_config() -> CalicoConfig:
    tiny = CalicoConfig.tiny()
    q = tiny.vision.qformer.replace(vocab_size=96, max_position_embeddings=32)
    return tiny.replace(vision=tiny.vision.replace(qformer=q), qformer_text_input=True, qformer_max_tokens=24)


def random_params(cfg, seed=0):
    shapes = flax.linen.unbox(pretrained.abstract_params(Calico(cfg)))
    g = np.random.default_rng(seed)
    return jax.tree.map(lambda v: g.normal(0, 0.2, v.shape).astype(np.float32), shapes)


def hf_instructblip(cfg, params):
    """transformers' InstructBLIP (stub LLM) with our vision params (HF names = our canonical names)."""
    from convert.families.lavis_blip2 import hf_model
    model = hf_model(cfg.vision)
    state = {}
    for path, v in jax.tree_util.tree_leaves_with_path(
            {k: params[k] for k in ("vision_model", "qformer", "query_tokens", "language_projection")}):
        keys = tuple(p.key for p in path)
        state[author_layout.canonical_from_flax(keys)] = torch.from_numpy(author_layout.to_torch_layout(keys[-1], v))
    for name in [k for k in state if k.endswith("self_attn.q_bias")]:   # HF: one qkv bias, K third zero
        q, v = state.pop(name), state.pop(name[:-len("q_bias")] + "v_bias")
        state[name[:-len("q_bias")] + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("language_model.") for k in missing), (missing, unexpected)
    return model.eval()


def test_on_path_matches_instructblip():
    cfg = text_config()
    params = random_params(cfg)
    assert "word_embeddings" in params["qformer"]["embeddings"]   # the switch creates the instruction embeddings
    model = hf_instructblip(cfg, params)
    r = np.random.default_rng(1)
    pixels = r.standard_normal((3, 3, 28, 28)).astype(np.float32)
    ids = r.integers(1, 96, (3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0   # a padded instruction
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=torch.from_numpy(pixels), qformer_input_ids=torch.from_numpy(ids),
                                       qformer_attention_mask=torch.from_numpy(mask), interpolate_pos_encoding=True)
    module = Calico(cfg)
    x_global, tokens = jax.jit(lambda p, x, i, m: module.apply({"params": p}, x, i, m, method="encode_images"))(
        params, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    assert rel_err(x_global, ref.last_hidden_state) < 1e-5
    assert rel_err(tokens, ref.pooler_output) < 1e-5
    same_text = np.asarray(tokens)[0]   # row 0 vs a text-free Q-Former in torch: the text changes the tokens
    with torch.no_grad():
        no_text = model.language_projection(model.qformer(
            input_ids=torch.zeros((3, 0), dtype=torch.long), query_embeds=model.query_tokens.expand(3, -1, -1),
            encoder_hidden_states=ref.last_hidden_state).last_hidden_state)
    assert rel_err(same_text, no_text[0]) > 1e-3


def test_forward_needs_the_text():
    cfg = text_config()
    module = Calico(cfg)
    inputs = module.dummy_inputs().replace(qformer_input_ids=None)
    with pytest.raises(ValueError, match="qformer_input_ids"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), inputs))


def test_qformer_tokenizer(tmp_path):
    build_tiny_qformer_tokenizer(tmp_path / "qformer_tokenizer")
    tok = load_qformer_tokenizer(tmp_path / "qformer_tokenizer")
    assert tok.bos_token == "[DEC]" and tok.truncation_side == "left" and len(tok) <= 96
    text = QFormerText(tok, 24)
    out = text("The <image> (IMAGE1) and <image> (IMAGE2) show a dog. What are the common parts?")
    ids, mask = out["qformer_input_ids"], out["qformer_attention_mask"]
    assert ids.shape == mask.shape == (24,) and ids.dtype == np.int32 and mask.sum() == 24
    assert tok.unk_token_id not in ids.tolist()
    assert tok.decode(ids[mask.astype(bool)], skip_special_tokens=True).replace(" ", "").endswith("commonparts?")
    short = text("a dog")   # right-padded with [PAD]
    # [CLS] a d ##o ##g [SEP], then [PAD]
    assert short["qformer_attention_mask"].sum() == 6 and short["qformer_input_ids"][6:].tolist() == [0] * 18


def test_task_batch_spec_and_forward_shapes():
    from calico_jax.train.calico_task import CalicoTask
    from configs import tiny
    cfg = tiny.get_config()
    cfg = cfg.replace(model=text_config().replace(vocab_from_tokenizer=False))
    task = CalicoTask(cfg, plan_only=True)
    spec = task.batch_spec(2)
    assert spec["qformer_input_ids"] == ((2, 24), jnp.int32) and spec["qformer_attention_mask"] == ((2, 24), jnp.int32)
    batch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in spec.items()}
    params = flax.linen.unbox(pretrained.abstract_params(task.module))
    out = jax.eval_shape(lambda p, b: task.forward(p, b, True), params, batch)
    assert out["logits"].shape[0] == 2
    assert "qformer_input_ids" not in CalicoTask(tiny.get_config(), plan_only=True).batch_spec(2)


def test_hf_blip2_keeps_the_qformer_tokenizer(tmp_path):
    """An InstructBLIP directory's qformer_tokenizer/ (InstructBlipProcessor.save_pretrained) -> OUT/tokenizer/."""
    from tests.helpers import run_convert
    from tests.test_convert_blip2 import hf_model
    hf_model("instructblip").save_pretrained(tmp_path / "src")
    build_tiny_qformer_tokenizer(tmp_path / "src" / "qformer_tokenizer")
    rc, stdout, err = run_convert("hf-blip2", "--src", tmp_path / "src", "--out", tmp_path / "out")
    assert rc == 0, err
    assert "Q-Former tokenizer: " in stdout
    tok = load_qformer_tokenizer(tmp_path / "out" / "tokenizer")
    assert tok.convert_tokens_to_ids("##q") == load_qformer_tokenizer(tmp_path / "src" / "qformer_tokenizer") \
        .convert_tokens_to_ids("##q")


def test_predictor_feeds_the_question_to_the_qformer(tmp_path):
    """Inference with the switch on: load_predictor reads TOKENIZER/qformer_tokenizer/, and the predictor's
    generation is the one run with the question's Q-Former tokens (which change the prefill)."""
    from calico_jax.core.tokens import SEG_TOKEN
    from calico_jax.data.tokenize import build_tiny_tokenizer
    from calico_jax.inference import export
    from calico_jax.inference.predict import build_question
    from calico_jax.inference.predictor import Predictor, generate_program, load_predictor

    tok_dir = tmp_path / "tok"
    tokenizer = build_tiny_tokenizer(tok_dir, ["The images show <p> wheel </p> [SEG] (IMAGE1)."] * 4, vocab_size=200)
    qtok = build_tiny_qformer_tokenizer(tok_dir / "qformer_tokenizer")
    cfg = text_config()
    cfg = cfg.replace(llm=cfg.llm.replace(vocab_size=len(tokenizer)),
                      seg=cfg.seg.replace(token_id=tokenizer.convert_tokens_to_ids(SEG_TOKEN), identifier_ids=()))
    params = random_params(cfg, seed=1)
    with pytest.raises(ValueError, match="qformer_text_input on"):
        Predictor(Calico(cfg), params, tokenizer)
    model_dir = export.save(tmp_path / "model", cfg, params, tok_dir)
    pred = load_predictor(model_dir, max_new_tokens=4, prompt_bucket=1)   # no padding: one compiled program
    assert pred.qformer_text is not None
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(2)]
    question = build_question(2, "common-parts")
    out = pred.predict([(images, question)])[0]

    ids = np.asarray([pred.prompt_ids(question, 2)], np.int32)
    px = {k: None if v is None else jnp.asarray(v[None]) for k, v in pred.image_fields(images).items()}
    base = CalicoInputs(input_ids=jnp.asarray(ids), attention_mask=jnp.ones(ids.shape, bool), **px)
    kw = dict(module=pred.module, max_new_tokens=4, eos=int(tokenizer.eos_token_id), pad=int(tokenizer.pad_token_id))
    text = QFormerText(qtok, cfg.qformer_max_tokens)
    right = {k: jnp.asarray(v) for k, v in text.batch([question]).items()}
    other = {k: jnp.asarray(v) for k, v in text.batch(["a different instruction"]).items()}
    tokens, lengths, hidden, _ = generate_program(pred.params, base.replace(**right), **kw)
    _, _, hidden_other, _ = generate_program(pred.params, base.replace(**other), **kw)
    assert rel_err(np.asarray(hidden_other)[0, :1], np.asarray(hidden)[0, :1]) > 1e-5   # the text is live
    gen = np.asarray(tokens)[0, :int(lengths[0])].tolist()
    gen = gen[:-1] if gen and gen[-1] == tokenizer.eos_token_id else gen
    assert out.answer == tokenizer.decode(gen).strip() and out.num_tokens == int(lengths[0])
    # what the predictor runs is what the AOT predict plan compiles: the contract's "predict" fields, text included
    made = pred.make_inputs([(images, question)])
    fields = spec(pred.module.config, 1, 2, made.input_ids.shape[1], program="predict")
    assert {k: (v.shape, v.dtype) for k, v in as_dict(made).items()} == \
        {k: (f.shape, np.dtype(f.dtype)) for k, f in fields.items()}
    assert "qformer_input_ids" in fields
