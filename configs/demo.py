"""`make demo`: a small CALICO trained from scratch on 2 CPU cores that learns synthetic part co-segmentation.

Every module is present (EVA ViT, Q-Former, DINOv2 + CEM, LLaMA with CAMs, SAM) but small, and all of it is
trained (nothing pretrained exists offline). Inputs are 64 px (EVA and SAM, patch 8: 8x8 grids) so parts
are resolvable; the LLM is wide enough for the ~400-token vocabulary.

Data (``data.synthetic`` / ``data.synthetic_heldout``, built under WORKDIR/data by the task): an *easy* synthetic
set -- one object per image (with several, a part question has several right answers), no clutter or
occluders, and each class in its own hue (``class_colors``). With the default random colours only shape
identifies a class, and a ViT trained from scratch on ~1k images for a few CPU minutes does not learn it
(measured: the demo's EVA + Q-Former reached 8-17 % train accuracy on a direct 12-way classification after 600
steps, vs 77 % held-out with class colours after 400). Held-out pairs come from images drawn with another seed.

Images per sample: one training set mixes N = 2, 3 and 4 (``image_counts``; the pair builder's default count per
task and N, so about a third each: ~3500 samples per N from the 1200 images), each padded to
``max_images = 4`` slots with ``image_valid`` marking the real ones. The held-out set has every N = 2 sample
(the set the bar was set on) and 40 per task at N = 3 and 4; the demo reports each N on its own.

Measured step times (the training step, batch 8, XLA:CPU on this project's 2-core AMD EPYC VM; the shapes
interleaved in one process so host load hits them alike; median s/step over 30-50 steps; a quiet host, then two
sessions with other jobs running, load 4-6, where only the ratios count):

=====================================================  =======  ========  ========
batch shape (N image slots, T tokens, M [SEG] slots)    quiet    loaded    loaded
=====================================================  =======  ========  ========
N 2, T 176, M 12 (the pairs-only demo)                  0.204    0.365     0.313
N 2, T 240, M 24                                        0.283    0.518     0.476
N 3, T 240, M 24                                        --       0.577     --
N 4, T 240, M 24 (this config)                          0.332    0.608     0.569
N 4, T 240, M 20                                        0.345    --        0.540
N 4, T 240, M 12                                        --       0.516     --
=====================================================  =======  ========  ========

The padded step costs 1.6-1.8x the pairs-only one, and most of that is the token budget and the [SEG] slots a
4-image answer needs, not the two extra image slots. Padding vs grouping by N: grouped batches at the same T and
M would save ~7 % per step (~35 s over 1400 steps) and compile the step three times instead of once (~30 s per
compile quiet, 40-50 s loaded); with T and M per N as well ~19 % (~90 s) against ~60 s of extra compiles and a
bucketing pipeline. So: padding, one compile. 1400 steps (as the pairs-only demo) take ~8.5 min of training on a
quiet host (~0.34 s/step + ~30 s compile); a loaded host takes longer (0.55-0.6 s/step at load 4-6).

Shapes: ``max_tokens`` 240 fits every sample (the longest 4-image prompt + answer is 217 tokens with the demo's
tokenizer; a longer one would be skipped, counted in the training metrics and printed by the demo);
``seg.max_seg`` 24 fits any answer of up to 4 images (4 objects + 4 x 5 parts; the sets' largest is 20), within
noise of 20's step time.
"""
from calico_jax.core.preprocess import Preprocess
from calico_jax.models.calico import CalicoConfig
from calico_jax.train.config import CheckpointConfig, DataConfig, RecipeConfig, SyntheticConfig
from configs import common

IMAGE = 64        # EVA and SAM input side (patch 8 -> 8x8 tokens)
DINO = 56         # DINOv2 input side (patch 14 -> 4x4 tokens)
EASY = {"max_objects": 1, "object_scale": (0.25, 0.4), "clutter": False, "class_colors": True}
NS = (2, 3, 4)    # images per sample, in one padded training set (max_images = 4 slots; docstring)
MAX_SEG = 24      # [SEG] slots (docstring)
MAX_TOKENS = 240  # prompt + answer tokens (docstring)
HELDOUT_PER_TASK = (0, 40, 40)   # held-out samples per task and N (0: every one the builder draws)


def model(image: int = IMAGE, dino: int = DINO) -> CalicoConfig:
    """CalicoConfig.tiny() widened: 64-wide EVA/Q-Former at ``image`` px, 96-wide LLaMA, SAM at ``image`` px."""
    t, g = CalicoConfig.tiny(), image // 8
    vision = t.vision.replace(
        vision=t.vision.vision.replace(image_size=image, patch_size=8, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4),
        qformer=t.vision.qformer.replace(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, encoder_hidden_size=64),
        num_query_tokens=8, text_hidden_size=96)
    sam = t.sam.replace(
        image_encoder=t.sam.image_encoder.replace(img_size=image, patch_size=8, embed_dim=64, num_heads=4,
                                                  out_chans=64, window_size=4),
        prompt_encoder=t.sam.prompt_encoder.replace(embed_dim=64, image_embedding_size=(g, g),
                                                    input_image_size=(image, image)),
        mask_decoder=t.sam.mask_decoder.replace(
            transformer_dim=64, iou_head_hidden_dim=32,
            transformer=t.sam.mask_decoder.transformer.replace(embedding_dim=64, num_heads=4, mlp_dim=128)))
    return t.replace(
        vision=vision, sam=sam,
        dinov2=t.dinov2.replace(image_size=dino, hidden_size=32, num_attention_heads=4),
        cem=t.cem.replace(num_heads=4),
        llm=t.llm.replace(hidden_size=96, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=24, max_position_embeddings=320),
        seg=t.seg.replace(max_seg=MAX_SEG),
        preprocess=Preprocess(blip_size=image, dinov2_size=dino, dinov2_crop=dino, sam_size=image, mask_size=image))


def get_config():
    return common.experiment(
        "demo", model(), recipe=RecipeConfig(trainable=(".*",)),   # nothing pretrained: train every weight
        data=DataConfig(synthetic=SyntheticConfig(num_images=1200, seed=0, image_counts=NS, **EASY),
                        synthetic_heldout=SyntheticConfig(num_images=80, seed=1, image_counts=NS,
                                                          per_task=HELDOUT_PER_TASK, **EASY),
                        max_images=max(NS), max_tokens=MAX_TOKENS, hflip=0.5, color_jitter=0.2),
        optim=common.paper_optim(learning_rate=2e-3, warmup_steps=50, decay="cosine", end_lr_ratio=0.05),
        checkpoint=CheckpointConfig(max_to_keep=1),
        total_steps=1400, checkpoint_every=500, log_every=10, eval_every=0, batch_size=8)
