"""Losses against direct PyTorch implementations of GLaMM's formulas (model/GLaMM.py l.10-34, l.251-285)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calico_jax.train.losses import (
    LossConfig,
    calico_loss,
    causal_lm_loss,
    causal_lm_loss_from_hidden,
    mask_losses,
    pixel_mask,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional


def glamm_dice(inputs, targets, num_masks, scale=1000, eps=1e-6):
    inputs = inputs.sigmoid().flatten(1, 2)
    targets = targets.flatten(1, 2)
    numerator = 2 * (inputs / scale * targets).sum(-1)
    denominator = (inputs / scale).sum(-1) + (targets / scale).sum(-1)
    return (1 - (numerator + eps) / (denominator + eps)).sum() / (num_masks + 1e-8)


def glamm_bce(inputs, targets, num_masks):
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.flatten(1, 2).mean(1).sum() / (num_masks + 1e-8)


def torch_focal(inputs, targets, num_masks, alpha, gamma):
    p = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.flatten(1, 2).mean(1).sum() / (num_masks + 1e-8)


def make(seed=0):
    """B=3 samples with 2, 0 and 3 masks (M=3 slots), each sample at its own original size."""
    r = np.random.default_rng(seed)
    b, m, hp, wp = 3, 3, 12, 14
    sizes = np.asarray([[10, 14], [12, 12], [7, 9]])
    counts = [2, 0, 3]
    logits = (r.standard_normal((b, m, hp, wp)) * 3).astype(np.float32)
    gt = (r.random((b, m, hp, wp)) > 0.6).astype(np.float32)
    valid = np.zeros((b, m), bool)
    for i, c in enumerate(counts):
        valid[i, :c] = True
    vocab, t = 11, 9
    text_logits = r.standard_normal((b, t, vocab)).astype(np.float32)
    labels = r.integers(0, vocab, (b, t))
    labels[:, :4] = -100
    labels[1, 6:] = -100
    hw = np.broadcast_to(sizes[:, None], (b, m, 2))
    return logits, gt, valid, sizes, counts, text_logits, labels, hw


def glamm_total(logits, gt, sizes, counts, text_logits, labels, pixel="bce", w=(1.0, 2.0, 0.5), alpha=0.25, gamma=2.0):
    """GLaMM's loop: per sample, crop to the original size, mean over its masks, times n_b; / N."""
    ce = F.cross_entropy(torch.from_numpy(text_logits[:, :-1]).reshape(-1, text_logits.shape[-1]),
                         torch.from_numpy(labels[:, 1:]).reshape(-1), ignore_index=-100)
    pix, dice, n = 0.0, 0.0, 0
    for i, c in enumerate(counts):
        if c == 0:
            continue
        h, wd = sizes[i]
        x = torch.from_numpy(logits[i, :c, :h, :wd])
        g = torch.from_numpy(gt[i, :c, :h, :wd])
        pix = pix + (glamm_bce(x, g, c) if pixel == "bce" else torch_focal(x, g, c, alpha, gamma)) * c
        dice = dice + glamm_dice(x, g, c) * c
        n += c
    pix, dice = pix / (n + 1e-8), dice / (n + 1e-8)
    return w[0] * ce + w[1] * pix + w[2] * dice, ce, pix, dice


@pytest.mark.parametrize("pixel", ["bce", "focal"])
def test_calico_loss_matches_glamm(pixel):
    logits, gt, valid, sizes, counts, text_logits, labels, hw = make()
    cfg = LossConfig(pixel_loss=pixel, focal_alpha=0.3, focal_gamma=1.5)
    outputs = {"logits": jnp.asarray(text_logits), "labels": jnp.asarray(labels), "mask_logits": jnp.asarray(logits),
               "mask_hw": jnp.asarray(hw), "seg_valid": jnp.asarray(valid)}
    total, parts = calico_loss(outputs, jnp.asarray(gt), cfg=cfg)
    ref_total, ce, pix, dice = glamm_total(logits, gt, sizes, counts, text_logits, labels, pixel, alpha=0.3, gamma=1.5)
    for got, want in ((total, ref_total), (parts["ce"], ce), (parts["pixel"], pix), (parts["dice"], dice)):
        assert abs(float(got) - float(want)) <= 1e-5 * max(abs(float(want)), 1e-3), (got, want)
    assert int(parts["num_masks"]) == 5
    shifted = labels[:, 1:]
    keep = shifted != -100
    acc = np.mean((text_logits[:, :-1].argmax(-1) == shifted)[keep])
    assert abs(float(parts["token_accuracy"]) - acc) < 1e-6 and int(parts["num_tokens"]) == keep.sum()
    # gt_valid removes masks from the count (and from the sums).
    _, p2 = calico_loss(outputs, jnp.asarray(gt), jnp.asarray([[1, 0, 0], [1, 1, 1], [1, 1, 1]]), cfg)
    assert int(p2["num_masks"]) == 4
    # The training path: CE from the final hidden states and the output kernel, against GLaMM's on their logits.
    rng = np.random.default_rng(7)
    hidden = rng.standard_normal((*text_logits.shape[:2], 12)).astype(np.float32)
    kernel = (rng.standard_normal((12, text_logits.shape[-1])) * 0.5).astype(np.float32)
    total_h, parts_h = calico_loss({**outputs, "logits": None, "hidden_states": jnp.asarray(hidden)}, jnp.asarray(gt),
                                   cfg=cfg, lm_head=jnp.asarray(kernel))
    ref_total, ce, _, _ = glamm_total(logits, gt, sizes, counts, hidden @ kernel, labels, pixel, alpha=0.3, gamma=1.5)
    for got, want in ((total_h, ref_total), (parts_h["ce"], ce)):
        assert abs(float(got) - float(want)) <= 1e-5 * max(abs(float(want)), 1e-3), (got, want)
    acc = np.mean(((hidden @ kernel)[:, :-1].argmax(-1) == shifted)[keep])
    assert abs(float(parts_h["token_accuracy"]) - acc) < 1e-6


def test_padding_pixels_and_slots_do_not_matter():
    logits, gt, valid, sizes, counts, text_logits, labels, hw = make(1)
    base = {"logits": jnp.asarray(text_logits), "labels": jnp.asarray(labels), "mask_hw": jnp.asarray(hw),
            "seg_valid": jnp.asarray(valid)}
    a = calico_loss(dict(base, mask_logits=jnp.asarray(logits)), jnp.asarray(gt))[0]
    noisy = logits.copy()
    region = np.asarray(pixel_mask(hw, logits.shape[-2:]))
    noisy[~region] = 1e3                                   # garbage outside each original size
    noisy[~valid] = -1e3                                   # and in the unused slots
    b = calico_loss(dict(base, mask_logits=jnp.asarray(noisy)), jnp.asarray(gt))[0]
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_no_masks_and_no_targets_are_finite():
    logits, gt, valid, sizes, counts, text_logits, labels, hw = make(2)
    out = {"logits": jnp.asarray(text_logits), "labels": jnp.full(labels.shape, -100),
           "mask_logits": jnp.asarray(logits), "mask_hw": jnp.asarray(hw), "seg_valid": jnp.zeros(valid.shape, bool)}
    total, parts = calico_loss(out, jnp.asarray(gt))
    assert float(total) == 0.0 and int(parts["num_masks"]) == 0 and int(parts["num_tokens"]) == 0


def test_pieces_against_torch_directly():
    r = np.random.default_rng(3)
    x = (r.standard_normal((4, 6, 5)) * 4).astype(np.float32)
    g = (r.random((4, 6, 5)) > 0.5).astype(np.float32)
    pix, dice = mask_losses(jnp.asarray(x), jnp.asarray(g), jnp.ones((4, 6, 5), bool))
    tx, tg = torch.from_numpy(x), torch.from_numpy(g)
    bce = F.binary_cross_entropy_with_logits(tx, tg, reduction="none").mean((1, 2))
    np.testing.assert_allclose(pix, bce, rtol=1e-5)
    np.testing.assert_allclose(float(dice.sum()) / 4, float(glamm_dice(tx, tg, 4)), rtol=1e-5)
    logits = r.standard_normal((2, 5, 7)).astype(np.float32)
    labels = np.asarray([[-100, 1, 2, -100, 3], [-100, -100, 6, 0, 4]])
    ce = causal_lm_loss(jnp.asarray(logits), jnp.asarray(labels))["ce"]
    ref = F.cross_entropy(torch.from_numpy(logits[:, :-1]).reshape(-1, 7), torch.from_numpy(labels[:, 1:]).reshape(-1))
    assert abs(float(ce) - float(ref)) <= 1e-5 * float(ref)


def test_loss_from_hidden_equals_the_loss_of_the_logits_with_its_gradients():
    """The fused output projection + CE (hand-written backward) against autodiff of causal_lm_loss(h @ W)."""
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.standard_normal((2, 9, 16), np.float32))
    w = jnp.asarray(rng.standard_normal((16, 50), np.float32) * 0.3)
    labels = rng.integers(0, 50, (2, 9)).astype(np.int32)
    labels[0, :4] = -100          # prompt positions
    labels[1, 6] = -100
    labels = jnp.asarray(labels)
    ref = lambda h, w: causal_lm_loss(h @ w, labels)                               # noqa: E731
    got = lambda h, w: causal_lm_loss_from_hidden(h, w, labels)                    # noqa: E731
    a, b = ref(h, w), got(h, w)
    np.testing.assert_allclose(float(b["ce"]), float(a["ce"]), rtol=1e-6)
    assert int(b["num_tokens"]) == int(a["num_tokens"]) == 12 and int(b["num_correct"]) == int(a["num_correct"])
    ga = jax.grad(lambda h, w: ref(h, w)["ce"], argnums=(0, 1))(h, w)
    gb = jax.grad(lambda h, w: got(h, w)["ce"], argnums=(0, 1))(h, w)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(gb[0][0, :3]).max()) == 0.0   # positions with no target get no gradient
    # a batch without targets: 0, no NaN
    none = causal_lm_loss_from_hidden(h, w, jnp.full((2, 9), -100, jnp.int32))
    assert float(none["ce"]) == 0.0 and int(none["num_tokens"]) == 0
    # bf16 compute: logits accumulate in fp32; gradients keep the operands' dtypes
    gh, gw = jax.grad(lambda h, w: causal_lm_loss_from_hidden(h, w, labels)["ce"], argnums=(0, 1))(
        h.astype(jnp.bfloat16), w)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(gw), np.asarray(gb[1]), rtol=0.05, atol=2e-3)
