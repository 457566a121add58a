"""The demo (configs/demo.py) trained on a mix of N = 2, 3 and 4 images per sample:

    python -m calico_jax.demo --config configs/demo_mixed.py --workdir runs/demo_mixed

One training set holds the pairs of configs/demo.py plus the pair builder's 3- and 4-image samples of the same
images (about a third each: ~3500 samples per N), each padded to ``max_images = 4`` slots with ``image_valid``
marking the real ones; the held-out set has every 2-image sample of the demo's own held-out set and 40 per task at
N = 3 and 4. The demo scores each N on its own; its bar stays on N = 2.

Shapes: ``max_tokens`` 240 fits every sample (the longest 4-image prompt + answer is 217 tokens with the demo's
tokenizer; a longer one would be skipped and counted); ``seg.max_seg`` 24 fits any answer of up to 4 images
(4 objects + 4 x 5 parts; the sets' largest is 20).

Padding rather than batches grouped by N: on this project's 2-core host the padded step (N 4, T 240, M 24) took
0.33 s against 0.20 s for the pairs-only one (N 2, T 176, M 12), and most of the difference is the token and
[SEG] budget of 4-image answers, not the two extra image slots (N 2 at T 240, M 24: 0.28 s). Grouping by N at
the same T and M would save ~7 % of the step and compile three programs instead of one; the measurement is in
``bench/results/history.md``.

Status: 1400 steps (10.5 min of training on that host) reach held-out mIoU 61.8 / 64.5 / 65.9 at N = 2 / 3 / 4
with a mask on every image of every sample, but the object names degrade (SS 66.7 at N = 2, against 93 for the
pairs-only demo), so this recipe misses the demo's SS bar and is not yet ``make demo``'s default.
"""
from configs import demo

NS = (2, 3, 4)                   # images per sample, in one padded training set
HELDOUT_PER_TASK = (0, 40, 40)   # held-out samples per task and N (0: every one the pair builder draws)


def get_config():
    cfg = demo.get_config()
    syn, held = cfg.data.synthetic, cfg.data.synthetic_heldout
    return cfg.replace(
        name="demo_mixed", model=cfg.model.replace(seg=cfg.model.seg.replace(max_seg=24)),
        data=cfg.data.replace(synthetic=syn.replace(image_counts=NS),
                              synthetic_heldout=held.replace(image_counts=NS, per_task=HELDOUT_PER_TASK),
                              max_images=max(NS), max_tokens=240))
