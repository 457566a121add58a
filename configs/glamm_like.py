"""Comparison recipe: GLaMM-style training on the same backbone, without CALICO's modules.

CEM and CAMs are off (model.options), and the trainable set is GLaMM's: LoRA, the [SEG] projection
(text_hidden_fcs), the SAM mask decoder, lm_head and embed_tokens (paper-notes §2.4), lr 3e-4
(GLaMM default). NOTE: the paper's "Multi-Image GLaMM" baseline uses GLaMM's own CLIP-L/14-336 vision
path (576 tokens per image); this config keeps CALICO's 32-token Q-Former path, so it isolates the
effect of the CEM/CAM modules and the trainable set, not of the image tokenizer.
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
        model=cfg.model.replace(trainable=GLAMM_TRAINABLE, options={"cam": {"layers": []}, "cem": {"enabled": False}}),
        optim=cfg.optim.replace(learning_rate=3e-4))
