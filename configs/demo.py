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
"""
from calico_jax.core.preprocess import Preprocess
from calico_jax.models.calico import CalicoConfig
from calico_jax.train.config import CheckpointConfig, DataConfig, RecipeConfig, SyntheticConfig
from configs import common

IMAGE = 64        # EVA and SAM input side (patch 8 -> 8x8 tokens)
DINO = 56         # DINOv2 input side (patch 14 -> 4x4 tokens)
EASY = {"max_objects": 1, "object_scale": (0.25, 0.4), "clutter": False, "class_colors": True}


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
        seg=t.seg.replace(max_seg=12),
        preprocess=Preprocess(blip_size=image, dinov2_size=dino, dinov2_crop=dino, sam_size=image, mask_size=image))


def get_config():
    return common.experiment(
        "demo", model(), recipe=RecipeConfig(trainable=(".*",)),   # nothing pretrained: train every weight
        data=DataConfig(synthetic=SyntheticConfig(num_images=1200, seed=0, **EASY),
                        synthetic_heldout=SyntheticConfig(num_images=80, seed=1, **EASY),
                        max_images=2, max_tokens=176, hflip=0.5, color_jitter=0.2),
        optim=common.paper_optim(learning_rate=2e-3, warmup_steps=50, decay="cosine", end_lr_ratio=0.05),
        checkpoint=CheckpointConfig(max_to_keep=1),
        total_steps=1400, checkpoint_every=500, log_every=10, eval_every=0, batch_size=8)
