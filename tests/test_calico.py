"""The CALICO model on the tiny config: splicing, [SEG] routing, CAM/CEM behaviour against a PyTorch
reference written from the paper's equations, masks, and training only the trainable split."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from calico_jax.core import params as st
from calico_jax.core.resize import bilinear_matrix
from calico_jax.models.calico import Calico, CalicoConfig
from calico_jax.models.calico_layout import expand_sequence, postprocess_masks
from calico_jax.models.cam import CamConfig
from calico_jax.models.cem import CemConfig, CorrespondenceExtraction
from calico_jax.models.inputs import split
from calico_jax.models.seg_routing import route_segs, seg_hidden_index
from calico_jax.train.config import PAPER_TRAINABLE
from calico_jax.train.losses import calico_loss
from calico_jax.train.step import value_and_grad_trainable
from tests.helpers import rel_err

IMG, SEG = -200, 60
I1, I2, I3 = [61, 62], [61, 63], [61, 5, 59]          # (IMAGE1), (IMAGE2), (IMAGE3) in the tiny config
PROMPTS = [[1, 7, IMG, 8, 9], [1, 7, IMG, 8, IMG, 9, IMG, 13]]
ANSWERS = [[10, SEG, *I1, 11, SEG, *I1, SEG, 12, 2],            # 3rd [SEG] has no identifier
           [10, SEG, *I2, SEG, *I3, 14, SEG, *I1, 2]]
T, N = 22, 3


def make_batch(cfg, prompts=PROMPTS, answers=ANSWERS, seed=0, sizes=None):
    r = np.random.default_rng(seed)
    b = len(prompts)
    ids = np.zeros((b, T), np.int32)
    labels = np.full((b, T), -100, np.int32)
    mask = np.zeros((b, T), np.int32)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = p + a
        ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
        labels[i, len(p):len(seq)] = a
    ev, dv, s = cfg.vision.vision.image_size, cfg.preprocess.dinov2_side, cfg.sam.image_encoder.img_size
    sizes = np.asarray(sizes if sizes is not None else [[[40, 30], [20, 36], [33, 33]]] * b, np.int32)
    scale = s / sizes.max(-1, keepdims=True)
    resized = np.floor(sizes * scale + 0.5).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": r.standard_normal((b, N, ev, ev, 3)).astype(np.float32),
            "dino_pixel_values": r.standard_normal((b, N, dv, dv, 3)).astype(np.float32),
            "sam_pixel_values": r.standard_normal((b, N, s, s, 3)).astype(np.float32),
            "resized_hw": resized, "mask_hw": sizes}


def apply(m, params, batch, **kw):
    """The model on a flat batch with the contract's names (calico_jax.models.inputs), labels included."""
    inputs, targets = split(batch)
    return m.apply({"params": params}, inputs, labels=targets.labels, **kw)


def randomize(params, seed, scale=0.2):
    """Random values for the zero-initialised leaves too (CAM, CEM out_proj, LoRA B)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def model():
    cfg = CalicoConfig.tiny()
    m = Calico(cfg)
    params = nn.unbox(jax.jit(m.init)(jax.random.key(0), m.dummy_inputs())["params"])
    fwd = jax.jit(lambda p, batch: apply(m, p, batch))
    return cfg, m, params, fwd


def expected_layout(prompt, answer, q, hidden_shift=1):
    """Expanded positions by building the expanded list in Python."""
    seq, image_pos, seg_pos, newpos = [], [], [], []
    for tok in prompt + answer:
        newpos.append(len(seq))
        if tok == IMG:
            image_pos.append(list(range(len(seq), len(seq) + q)))
            seq += ["img"] * q
        else:
            if tok == SEG:
                seg_pos.append(len(seq) - hidden_shift)
            seq.append(tok)
    return image_pos, seg_pos, newpos[len(prompt) - 1]


def test_init_names_and_trainable_split(model):
    cfg, m, params, _ = model
    assert set(params) == {"vision_model", "qformer", "query_tokens", "language_projection", "dinov2", "cem",
                           "cam_query_tokens", "cam_1", "cam_3", "llm", "sam", "text_hidden_fcs_0_0",
                           "text_hidden_fcs_0_2"}
    np.testing.assert_array_equal(params["cam_query_tokens"], params["query_tokens"])   # copy of q at init
    for leaf in jax.tree.leaves([params["cam_1"], params["cem"]["out_proj"]]):
        assert not np.any(np.asarray(leaf))                                                # zero-initialised
    assert "point_embeddings_0" in params["sam"]["prompt_encoder"]                          # unused tables exist
    assert st.unmatched_patterns(params, PAPER_TRAINABLE) == []
    train, frozen = st.partition(params, PAPER_TRAINABLE)
    names = ["/".join(k) for k in traverse_util.flatten_dict(train)]
    assert all(n.startswith(("cem/", "cam_", "sam/mask_decoder/")) or "/lora_" in n for n in names)
    assert any("/lora_a" in n for n in names) and any(n.startswith("sam/mask_decoder/") for n in names)
    assert "text_hidden_fcs_0_0" in frozen and "image_encoder" in frozen["sam"] and "lm_head" in frozen["llm"]
    boxed = jax.eval_shape(lambda k: m.init(k, m.dummy_inputs()), jax.random.key(0))["params"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned)):
        assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)


def test_forward_mixed_image_counts_routing_and_positions(model):
    """One batch with N=1 and N=3 samples: positions from the expanded sequence, routing by identifier."""
    cfg, m, params, fwd = model
    batch = make_batch(cfg)
    out = fwd(params, batch)
    q = cfg.vision.num_query_tokens
    t_exp = T + N * (q - 1)
    assert out["logits"].shape == (2, t_exp, cfg.llm.vocab_size)
    assert out["mask_logits"].shape == (2, cfg.seg.max_seg, *cfg.mask_size)
    np.testing.assert_array_equal(out["image_valid"], [[1, 0, 0], [1, 1, 1]])
    for i in range(2):
        image_pos, seg_pos, last = expected_layout(PROMPTS[i], ANSWERS[i], q)
        np.testing.assert_array_equal(out["image_positions"][i, :len(image_pos)], image_pos)
        np.testing.assert_array_equal(out["seg_positions"][i, :len(seg_pos)], seg_pos)
        assert int(out["last_prompt_index"][i]) == last
        # The expanded labels: answer tokens keep their ids, shifted by the image blocks.
        assert int(np.sum(np.asarray(out["labels"][i]) != -100)) == len(ANSWERS[i])
        assert np.all(np.asarray(out["labels"][i])[np.asarray(image_pos).ravel()] == -100)
    np.testing.assert_array_equal(out["seg_valid"], [[1, 1, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(np.where(out["seg_valid"], out["seg_image"], -1), [[0, 0, -1, -1], [1, 2, 0, -1]])
    np.testing.assert_array_equal(out["num_unrouted_seg"], [1, 0])
    np.testing.assert_array_equal(out["mask_hw"][1, :3], [[20, 36], [33, 33], [40, 30]])
    masks = np.asarray(out["mask_logits"])
    assert np.all(np.isfinite(masks)) and np.all(masks[1, 0, 20:] == 0) and np.all(masks[1, 0, :, 36:] == 0)
    assert np.abs(masks[1, 0, :20, :36]).min() > 0


def test_swapping_images_and_identifiers_swaps_masks(model):
    cfg, m, params, fwd = model
    prompts = [[1, 7, IMG, 8, IMG, 9]] * 2
    answers = [[10, SEG, *I1, 11, SEG, *I2, 2], [10, SEG, *I2, 11, SEG, *I1, 2]]
    base = make_batch(cfg, prompts, answers, sizes=[[[40, 30], [20, 36], [33, 33]], [[20, 36], [40, 30], [33, 33]]])
    swapped = dict(base)
    for k in ("pixel_values", "dino_pixel_values", "sam_pixel_values", "resized_hw"):
        swapped[k] = base[k].copy()
        swapped[k][1, [0, 1]] = base[k][0, [1, 0]]
        swapped[k][0] = base[k][0]
    # (a) [SEG] embeddings made independent of the LLM: the whole pipeline (images in every
    # encoder, identifiers) swapped -> the two masks swap exactly.
    p = jax.tree.map(lambda x: x, params)
    p["text_hidden_fcs_0_2"] = {"kernel": jnp.zeros_like(params["text_hidden_fcs_0_2"]["kernel"]),
                                "bias": jax.random.normal(jax.random.key(3),
                                                          params["text_hidden_fcs_0_2"]["bias"].shape)}
    out = fwd(p, swapped)
    ml = np.asarray(out["mask_logits"])
    np.testing.assert_array_equal(out["seg_image"][:, :2], [[0, 1], [1, 0]])
    np.testing.assert_allclose(ml[1, 0], ml[0, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ml[1, 1], ml[0, 1], rtol=1e-5, atol=1e-5)
    assert np.abs(ml[0, 0] - ml[0, 1]).max() > 1e-3
    # (b) real params, LLM input unchanged up to the first [SEG]: SAM images + identifier swapped
    # -> the first [SEG] (same hidden state, causal) still gets image A's mask.
    sam_swap = dict(base)
    sam_swap["pixel_values"] = np.stack([base["pixel_values"][0]] * 2)
    sam_swap["dino_pixel_values"] = np.stack([base["dino_pixel_values"][0]] * 2)
    sam_swap["sam_pixel_values"], sam_swap["resized_hw"] = swapped["sam_pixel_values"], swapped["resized_hw"]
    ml = np.asarray(fwd(params, sam_swap)["mask_logits"])
    np.testing.assert_allclose(ml[1, 0], ml[0, 0], rtol=1e-5, atol=1e-5)
    # Control: identifiers swapped but SAM images not -> the first [SEG] now gets image B's mask.
    sam_swap["sam_pixel_values"], sam_swap["resized_hw"] = (np.stack([base[k][0]] * 2) for k in
                                                            ("sam_pixel_values", "resized_hw"))
    control = np.asarray(fwd(params, sam_swap)["mask_logits"])
    assert np.abs(control[1, 0] - ml[0, 0]).max() > 1e-3


def test_zero_init_cams_equal_no_cams_and_trained_cams_change_image_tokens_only_after(model):
    cfg, m, params, fwd = model
    batch = make_batch(cfg)
    with_cam = fwd(params, batch)["logits"]
    no_cfg = cfg.replace(cam=CamConfig(layers=()))
    no_params = {k: v for k, v in params.items() if not k.startswith("cam_")}
    no_cam = jax.jit(lambda p, b: apply(Calico(no_cfg), p, b))(no_params, batch)["logits"]
    np.testing.assert_array_equal(np.asarray(with_cam), np.asarray(no_cam))
    live = dict(params, cam_1=randomize(params["cam_1"], 1), cam_3=randomize(params["cam_3"], 2))
    changed = np.abs(np.asarray(fwd(live, batch)["logits"]) - np.asarray(with_cam)).max(-1)   # [B, T']
    first_image = [2, 2]                                   # expanded position of each sample's first image token
    for i, f in enumerate(first_image):
        assert changed[i, :f].max() == 0 and changed[i, f:].max() > 1e-4


def test_route_segs_rules_and_counts():
    cfg = CalicoConfig.tiny().seg
    ids = jnp.asarray([[SEG, *I3, SEG, SEG, *I2, SEG, *I1, SEG, *I1, 0],
                       [SEG, 61, 9, SEG, *I3, 0, 0, 0, 0, 0, 0, 0, 0]])
    r = route_segs(ids, cfg, jnp.asarray([3, 2]))
    np.testing.assert_array_equal(r["position"], [[0, 4, 5, 8, ], [0, 3, -1, -1]])
    np.testing.assert_array_equal(r["valid"], [[1, 0, 1, 1], [0, 0, 0, 0]])          # row 1: bad ident, absent image
    np.testing.assert_array_equal(np.where(r["valid"], r["image"], -1), [[2, -1, 1, 0], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(r["num_unrouted"], [1, 2])
    np.testing.assert_array_equal(r["num_dropped"], [1, 0])                             # 5 [SEG] > max_seg 4
    first = route_segs(ids, cfg.replace(unrouted="first"), jnp.asarray([3, 2]))
    np.testing.assert_array_equal(first["valid"], [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(first["image"][1, :2], [0, 0])
    host = route_segs(ids, cfg, jnp.asarray([3, 2]), seg_image=jnp.asarray([[0, 1, 2, 3], [1, -1, 0, 0]]))
    np.testing.assert_array_equal(host["valid"], [[1, 1, 1, 0], [1, 0, 0, 0]])


def test_seg_hidden_index_teacher_forced_and_generated_agree():
    """One sequence ``... x [SEG]`` seen both ways: teacher-forced hidden[i] is token i's state; generated
    hidden[:, j] produced token j (so it is the teacher-forced state of the token before it)."""
    p = 7                                     # [SEG] position in the teacher-forced sequence
    j = 3                                     # the same [SEG] among the generated tokens, prompt ends at p - j - 1
    to_tf = lambda g: g + (p - j) - 1         # noqa: E731  generated hidden index -> teacher-forced position
    for position in ("before", "at"):
        tf = seg_hidden_index(p, position)
        assert tf == {"before": p - 1, "at": p}[position]
        assert to_tf(seg_hidden_index(j, position, generated=True)) == tf
    np.testing.assert_array_equal(seg_hidden_index(jnp.asarray([4, 9]), "before"), [3, 8])
    with pytest.raises(ValueError, match="hidden_position"):
        seg_hidden_index(1, "after")


def test_expand_sequence_static_shapes():
    ids = jnp.asarray([[1, IMG, 5, IMG, 6], [1, 2, IMG, 0, 0]])
    newpos, target, pos, has, t_exp = expand_sequence(ids, IMG, 3, 4)
    assert t_exp == 5 + 3 * 3
    np.testing.assert_array_equal(newpos, [[0, 1, 5, 6, 10], [0, 1, 2, 6, 7]])
    np.testing.assert_array_equal(has, [[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(pos[0, :2], [[1, 2, 3, 4], [6, 7, 8, 9]])
    assert np.all(np.asarray(pos[0, 2]) == t_exp) and np.asarray(target)[0, 1] == t_exp


@pytest.mark.parametrize("sizes", [((32, 24), (40, 30)), ((18, 32), (20, 36)), ((32, 32), (7, 7))])
def test_postprocess_matches_torch_interpolate(sizes):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    (rh, rw), (h, w) = sizes
    low = np.random.default_rng(0).standard_normal((1, 16, 16)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(low)[None], (32, 32), mode="bilinear", align_corners=False)
    ref = F.interpolate(ref[..., :rh, :rw], (h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    got = postprocess_masks(jnp.asarray(low), 32, jnp.asarray([[rh, rw]]), jnp.asarray([[h, w]]), (40, 40))[0]
    assert rel_err(got[:h, :w], ref) <= 1e-5
    assert np.all(np.asarray(got)[h:] == 0) and np.all(np.asarray(got)[:, w:] == 0)
    assert np.allclose(np.asarray(bilinear_matrix(rh, h, 40, 32)).sum(-1)[:h], 1.0)


@pytest.mark.parametrize("variant", ["shared-residual", "per_cam-prenorm-nores"])
def test_cem_and_cam_match_pytorch_reference(variant, tmp_path):
    """X'_global = X_global + MHA(X_global, X_sem, X_sem); q' = q + W_a t + b_a; X'_embed = 𝓠(q', X'_global);
    hidden[image i] += W_r X'_embed[i] + b_r -- in PyTorch (HF Q-Former) vs Flax."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.helpers import randomize as torch_randomize
    from tests.test_qformer import convert
    base = CalicoConfig.tiny()
    qc = base.vision.qformer
    hf = transformers.InstructBlipQFormerModel(transformers.InstructBlipQFormerConfig(
        hidden_size=qc.hidden_size, num_hidden_layers=qc.num_hidden_layers, num_attention_heads=qc.num_attention_heads,
        intermediate_size=qc.intermediate_size, cross_attention_frequency=qc.cross_attention_frequency,
        encoder_hidden_size=qc.encoder_hidden_size, vocab_size=qc.vocab_size,
        max_position_embeddings=qc.max_position_embeddings))
    hf.config._attn_implementation = "eager"
    torch_randomize(hf.eval(), seed=4)
    qcfg, qparams = convert(hf, tmp_path)
    shared = variant.startswith("shared")
    cem = CemConfig(num_heads=4) if shared else CemConfig(num_heads=8, residual=False, layer_norm=True)
    cfg = base.replace(vision=base.vision.replace(qformer=qcfg), cem=cem,
                       cam=CamConfig(layers=(1, 3), queries="shared" if shared else "per_cam"))
    m = Calico(cfg)
    # Shapes only (no init compile): every parameter this test reads is random or converted.
    abstract = nn.unbox(jax.eval_shape(lambda k: m.init(k, m.dummy_inputs()), jax.random.key(0))["params"])
    params = randomize(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract), 5)
    params["qformer"] = qparams
    r = np.random.default_rng(1)
    b, n, q, s_c = 2, 3, cfg.vision.num_query_tokens, 5
    xg = r.standard_normal((b * n, s_c, 32)).astype(np.float32)
    xs = r.standard_normal((b * n, 11, 24)).astype(np.float32)
    fused = CorrespondenceExtraction(cem).apply({"params": params["cem"]}, xg, xs)

    p = jax.tree.map(lambda x: torch.from_numpy(np.array(x)), params)
    mha = torch.nn.MultiheadAttention(32, cem.num_heads, kdim=24, vdim=24, batch_first=True)
    c = p["cem"]
    mha.q_proj_weight.copy_(c["q_proj"]["kernel"].T), mha.k_proj_weight.copy_(c["k_proj"]["kernel"].T)
    mha.v_proj_weight.copy_(c["v_proj"]["kernel"].T)
    mha.in_proj_bias.copy_(torch.cat([c["q_proj"]["bias"], c["k_proj"]["bias"], c["v_proj"]["bias"]]))
    mha.out_proj.weight.copy_(c["out_proj"]["kernel"].T), mha.out_proj.bias.copy_(c["out_proj"]["bias"])
    tq, tkv = torch.from_numpy(xg), torch.from_numpy(xs)
    if cem.layer_norm:
        tq = torch.nn.functional.layer_norm(tq, (32,), c["norm_q"]["scale"], c["norm_q"]["bias"], 1e-5)
        tkv = torch.nn.functional.layer_norm(tkv, (24,), c["norm_kv"]["scale"], c["norm_kv"]["bias"], 1e-5)
    ref_fused = mha(tq, tkv, tkv, need_weights=False)[0] + (torch.from_numpy(xg) if cem.residual else 0)
    assert rel_err(fused, ref_fused) <= 1e-5

    hidden = r.standard_normal((b, 30, cfg.llm.hidden_size)).astype(np.float32)
    lpi = np.asarray([4, 7])
    positions = np.asarray([[[1, 2, 3, 4], [10, 11, 12, 13], [30] * 4],
                            [[5, 6, 7, 8], [15, 16, 17, 18], [20, 21, 22, 23]]])
    valid = np.asarray([[1, 1, 0], [1, 1, 1]], bool)
    x_fused = np.asarray(fused).reshape(b, n, s_c, 32)
    for layer in (1, 3):
        got = m.apply({"params": params}, layer, jnp.asarray(hidden), jnp.asarray(lpi), jnp.asarray(x_fused),
                      jnp.asarray(positions), jnp.asarray(valid), method="cam_update")
        cam = p[f"cam_{layer}"]
        qtok = p["cam_query_tokens"] if shared else p[f"cam_query_tokens_{layer}"]
        ref = torch.from_numpy(hidden.copy())
        for i in range(b):
            t = ref[i, lpi[i]]
            q_guided = qtok[0] + (t @ cam["f_adaptation"]["kernel"] + cam["f_adaptation"]["bias"])      # Eq. 7
            for k in range(n):
                if not valid[i, k]:
                    continue
                x_embed = hf(input_ids=None, query_embeds=q_guided[None],
                             encoder_hidden_states=torch.from_numpy(x_fused[i, k])[None]
                             ).last_hidden_state[0, :q]                                                     # Eq. 8
                ref[i, positions[i, k]] += x_embed @ cam["f_reintegration"]["kernel"] + cam["f_reintegration"]["bias"]
        assert rel_err(got, ref) <= 1e-5, layer
        assert np.abs(np.asarray(got) - hidden).max() > 1e-3


def test_backward_step_and_overfit_one_batch(model):
    """Grads only for trainable leaves; frozen leaves untouched and stateless; one batch overfits."""
    cfg, m, params, _ = model
    batch = make_batch(cfg, seed=2)
    r = np.random.default_rng(3)
    gt = np.zeros((2, cfg.seg.max_seg, *cfg.mask_size), np.float32)
    for i in range(2):
        for k in range(cfg.seg.max_seg):
            y0, x0 = r.integers(0, 15, 2)
            gt[i, k, y0:y0 + 12, x0:x0 + 14] = 1
    batch_j = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_fn(p):
        return calico_loss(apply(m, p, batch_j), jnp.asarray(gt))

    # The paper's split plus lm_head, the final norm and f_segmentation: with a frozen random 48-wide
    # lm_head the CE alone has a floor near 1.1 (all tokens right, small logit margins).
    patterns = PAPER_TRAINABLE + (r"llm/lm_head/.*", r"llm/model/norm/.*", r"text_hidden_fcs.*")
    tx = optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.0)
    trainable, frozen = st.partition(params, patterns, strict=True)
    state = {"trainable": trainable, "opt_state": tx.init(trainable)}
    n_train = len(jax.tree.leaves(trainable))
    assert len(jax.tree.leaves(state["opt_state"])) == 2 * n_train + 1   # adam mu + nu (+ count): trainable only
    vg = value_and_grad_trainable(loss_fn, has_aux=True)

    @jax.jit
    def step(s, frozen):
        (loss, parts), grads = vg(s["trainable"], frozen)
        updates, opt_state = tx.update(grads, s["opt_state"], s["trainable"])
        return {"trainable": optax.apply_updates(s["trainable"], updates), "opt_state": opt_state}, parts, grads

    frozen_before = jax.tree.map(np.asarray, frozen)
    losses = []
    for i in range(70):
        state, parts, grads = step(state, frozen)
        losses.append(float(parts["loss"]))
        if i == 0:
            assert jax.tree.structure(grads) == jax.tree.structure(state["trainable"])
            # Zero-initialised f_reintegration: it gets a gradient, what feeds it (f_adaptation, CEM) not yet.
            assert float(jnp.abs(grads["cam_1"]["f_reintegration"]["kernel"]).max()) > 0
            assert float(jnp.abs(grads["cem"]["out_proj"]["kernel"]).max()) == 0
            assert int(parts["num_masks"]) == 5
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), frozen_before)   # untouched
    assert np.isfinite(losses).all()
    assert float(jnp.abs(state["trainable"]["cem"]["out_proj"]["kernel"]).max()) > 0   # CEM trains once CAMs do
    assert losses[-1] < 0.1 * losses[0], losses


def test_linear_image_path_ablation():
    """'Q-Former replaced by a linear projection': every EVA token X_global -> linear_projection -> LLM."""
    cfg = CalicoConfig.tiny(image_path="linear", cam=CamConfig(layers=()))
    m = Calico(cfg)
    params = nn.unbox(jax.jit(m.init)(jax.random.key(1), m.dummy_inputs())["params"])
    assert "linear_projection" in params and not {"qformer", "query_tokens", "language_projection"} & set(params)
    batch = make_batch(cfg)
    x_global, tokens = m.apply({"params": params}, batch["pixel_values"][0], method=Calico.encode_images)
    s = cfg.vision.vision.grid ** 2 + 1
    assert cfg.num_image_tokens == s and x_global.shape[1] == s and tokens.shape == (N, s, cfg.llm.hidden_size)
    w, bias = params["linear_projection"]["kernel"], params["linear_projection"]["bias"]
    ref = np.asarray(x_global, np.float64) @ np.asarray(w, np.float64) + np.asarray(bias, np.float64)
    assert rel_err(tokens, ref) <= 1e-5
    out = jax.jit(lambda p, b: apply(m, p, b))(params, batch)
    assert out["logits"].shape == (2, T + N * (s - 1), cfg.llm.vocab_size)
    image_pos, _, _ = expected_layout(PROMPTS[1], ANSWERS[1], s)
    np.testing.assert_array_equal(out["image_positions"][1, :len(image_pos)], image_pos)
    with pytest.raises(Exception, match="no Q-Former for CAMs"):
        CalicoConfig.tiny(image_path="linear")
