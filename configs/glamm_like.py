"""Comparison recipe: the paper's "Multi-Image GLaMM" baseline on the same LLM (Vicuna-7B + LoRA) and SAM.

Image path (model.options ``image_path="clip_mlp"``): GLaMM/LLaVA's CLIP-ViT-L/14-336 tower
(``hidden_states[-2]``, CLS dropped: 576 tokens per image) through GLaMM's ``mm_projector`` (Linear
1024->4096, GELU, Linear 4096->4096); no Q-Former, no DINOv2, CEM and CAMs off. Images enter at 336 px
(``data.blip_size``; BLIP-2 and CLIP share the OpenAI CLIP mean/std). The trainable set is GLaMM's:
LoRA, the [SEG] projection (text_hidden_fcs), the SAM mask decoder, lm_head and embed_tokens
(paper-notes §2.4; the CLIP tower and mm_projector stay frozen as in LISA/GLaMM), lr 3e-4 (GLaMM default).

    python train.py --config configs/glamm_like.py --dry_run
"""
from pathlib import Path
import importlib.util

GLAMM_TRAINABLE = (r"llm/.*/lora_(a|b)", r"text_hidden_fcs_.*", r"sam/mask_decoder/.*", r"llm/lm_head/.*",
                   r"llm/model/embed_tokens/.*")


def get_config():
    spec = importlib.util.spec_from_file_location("_calico_7b", Path(__file__).with_name("calico_7b.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    cfg = base.get_config()
    return cfg.replace(
        name="glamm_like",
        model=cfg.model.replace(trainable=GLAMM_TRAINABLE, options={
            "image_path": "clip_mlp", "cam": {"layers": []}, "cem": {"enabled": False}}),
        data=cfg.data.replace(blip_size=336, dinov2_size=0),
        optim=cfg.optim.replace(learning_rate=3e-4))
