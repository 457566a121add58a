"""Comparison recipe: the paper's "Multi-Image GLaMM" baseline on the same LLM (Vicuna-7B + LoRA) and SAM.

Image path (``model.image_path="clip_mlp"``): GLaMM/LLaVA's CLIP-ViT-L/14-336 tower (``hidden_states[-2]``,
CLS dropped: 576 tokens per image) through GLaMM's ``mm_projector`` (Linear 1024->4096, GELU, Linear
4096->4096); no Q-Former, no DINOv2, CEM and CAMs off. Images enter at 336 px (``model.preprocess.blip_size``;
BLIP-2 and CLIP share the OpenAI CLIP mean/std). The trainable set (``recipe.trainable``) is GLaMM's: LoRA,
the [SEG] projection (text_hidden_fcs), the SAM mask decoder, lm_head and embed_tokens (the CLIP tower and
mm_projector stay frozen as in LISA/GLaMM), lr 3e-4 (GLaMM default).

    python train.py --config configs/glamm_like.py --dry_run
"""
from calico_jax.models.cam import CamConfig
from calico_jax.models.cem import CemConfig
from configs import calico_7b

GLAMM_TRAINABLE = (r"llm/.*/lora_(a|b)", r"text_hidden_fcs_.*", r"sam/mask_decoder/.*", r"llm/lm_head/.*",
                   r"llm/model/embed_tokens/.*")


def get_config():
    cfg = calico_7b.get_config()
    model = cfg.model.replace(image_path="clip_mlp", cam=CamConfig(layers=()), cem=CemConfig(enabled=False),
                              preprocess=cfg.model.preprocess.replace(blip_size=336, dinov2_size=0, dinov2_crop=0))
    return cfg.replace(name="glamm_like", model=model, recipe=cfg.recipe.replace(trainable=GLAMM_TRAINABLE),
                       optim=cfg.optim.replace(learning_rate=3e-4))
