"""Vision-tower items: EVA ViT, Q-Former, DINOv2, SAM image encoder and mask decoder (JAX vs PyTorch)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import Result, ceiling_note, side_by_side
from calico_jax.checkpoints import converted as pretrained
from calico_jax.models.calico import Calico, CalicoConfig
from calico_jax.models.dinov2 import Dinov2, Dinov2Config
from calico_jax.models.eva_vit import EvaVit, EvaVitConfig
from calico_jax.models.qformer import QFormer, QFormerConfig
from calico_jax.models.sam import Sam, SamConfig
from convert.families.sam import build_original, original_prompt


def _params(module):
    return pretrained.init_params(module)


def _image_tower(name: str, ctx, module, ref, size: int) -> Result:
    """A ViT tower on a batch of 2 NHWC images vs its HF reference (NCHW ``pixel_values``)."""
    import torch
    x = np.random.default_rng(0).standard_normal((2, size, size, 3), dtype=np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x)["last_hidden_state"])
    return side_by_side(name, fn, (_params(module), jnp.asarray(x)), lambda: ref(pixel_values=xt),
                        peak_gflops=ctx.peak_gflops, bandwidth_gbs=ctx.bandwidth_gbs, repeats=ctx.repeats,
                        budget_s=ctx.budget_s)


def eva_vit(ctx) -> Result:
    """EVA-CLIP ViT at ViT-g width (1408/6144/16 heads), 6 layers, batch 2, 224 px."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    hf = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=6, num_attention_heads=16,
                           image_size=224, patch_size=14)
    return _image_tower("eva_vit", ctx, EvaVit(EvaVitConfig.from_hf_config(hf)), Blip2VisionModel(hf).eval(), 224)


def qformer(ctx) -> Result:
    """BLIP-2 Q-Former (12 layers, 768), 32 queries over 2×257×1408 image features."""
    import torch
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    hf = Blip2QFormerConfig(encoder_hidden_size=1408)
    ref = Blip2QFormerModel(hf).eval()
    module = QFormer(QFormerConfig.from_hf_config(hf))
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 32, 768), dtype=np.float32)
    img = rng.standard_normal((2, 257, 1408), dtype=np.float32)
    qt, it = torch.from_numpy(q), torch.from_numpy(img)
    fn = jax.jit(lambda p, q, i: module.apply({"params": p}, q, i))
    rows, h, f, n = q.shape[0] * q.shape[1], hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers
    n_cross = n // hf.cross_attention_frequency
    shapes = [(rows, h, h, 4 * n + 2 * n_cross), (rows, h, f, n), (rows, f, h, n),
              (img.shape[0] * img.shape[1], img.shape[2], h, 2 * n_cross)]   # self q,k,v,o + cross q,o; MLP; cross k,v
    return side_by_side("qformer", fn, (_params(module), jnp.asarray(q), jnp.asarray(img)),
                        lambda: ref(query_embeds=qt, encoder_hidden_states=it),
                        peak_gflops=ctx.peak_gflops, bandwidth_gbs=ctx.bandwidth_gbs, repeats=ctx.repeats,
                        budget_s=ctx.budget_s, note=ceiling_note(shapes, ctx.peak_gflops))


def dinov2(ctx) -> Result:
    """DINOv2-B/14 (HF config, 518-px position table), 224 px input, batch 2."""
    from transformers import Dinov2Config as HFDinov2Config
    from transformers import Dinov2Model

    hf = HFDinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        image_size=518, patch_size=14)
    return _image_tower("dinov2", ctx, Dinov2(Dinov2Config.from_hf_config(hf)), Dinov2Model(hf).eval(), 224)


def _sam_vit_b():
    config = SamConfig.preset("vit_b")
    return Sam(config), build_original(config)


def sam_image_encoder(ctx) -> Result:
    """SAM ViT-B image encoder on one 1024×1024 image."""
    import torch
    module, ref = _sam_vit_b()
    x = np.random.default_rng(0).standard_normal((1, 1024, 1024, 3), dtype=np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x, method="image_embeddings"))
    return side_by_side("sam_image_encoder", fn, (_params(module), jnp.asarray(x)), lambda: ref.image_encoder(xt),
                        peak_gflops=ctx.peak_gflops, bandwidth_gbs=ctx.bandwidth_gbs, repeats=ctx.repeats,
                        budget_s=ctx.budget_s)


def sam_mask_decoder(ctx) -> Result:
    """SAM prompt encoder + mask decoder: 4 [SEG]-style sparse prompts on one precomputed embedding."""
    import torch

    module, ref = _sam_vit_b()
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, 64, 64, 256), dtype=np.float32)
    seg = rng.standard_normal((4, 1, 256), dtype=np.float32)
    fn = jax.jit(lambda p, e, t: module.apply({"params": p}, image_embeddings=e, text_embeds=t,
                                              multimask_output=False)["low_res_masks"])
    emb_t, seg_t = torch.from_numpy(emb).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(seg)

    def torch_fn():
        sparse, dense = original_prompt(ref.prompt_encoder, text_embeds=seg_t)
        return ref.mask_decoder(emb_t, ref.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)

    # The decoder is small: the floor is reading the image embedding and its PE once per prompt.
    return side_by_side("sam_mask_decoder", fn, (_params(module), jnp.asarray(emb), jnp.asarray(seg)), torch_fn,
                        peak_gflops=ctx.peak_gflops, bandwidth_gbs=ctx.bandwidth_gbs, repeats=ctx.repeats,
                        budget_s=ctx.budget_s)


ITEMS = {"eva_vit": eva_vit, "qformer": qformer, "dinov2": dinov2, "sam_image_encoder": sam_image_encoder,
         "sam_mask_decoder": sam_mask_decoder}


def calico_tiny_inference(ctx) -> Result:
    """The tiny CALICO (every module present) on a pair of images: EVA + Q-Former, DINOv2 + CEM, LLM with
    CAMs, [SEG] -> SAM masks at the original size. No PyTorch counterpart exists."""
    cfg = CalicoConfig.tiny()
    module = Calico(cfg)
    dummy = module.dummy_inputs()   # a CalicoInputs (calico_jax.models.inputs): one sample, one image
    ids = np.asarray(dummy.input_ids)[0]
    img = cfg.image_token_index
    prompt = np.concatenate([ids[:2], ids[1:2], ids[2:], ids[2:]])  # <s> <image> <image> [SEG] id [SEG] id
    b, n = 1, 2
    rng = np.random.default_rng(0)

    def pixels(a):
        return jnp.asarray(rng.standard_normal((b, n, *a.shape[2:]), dtype=np.float32))

    inputs = dummy.replace(input_ids=jnp.asarray(prompt[None]), attention_mask=jnp.ones((1, len(prompt)), jnp.int32),
                           pixel_values=pixels(dummy.pixel_values), dino_pixel_values=pixels(dummy.dino_pixel_values),
                           sam_pixel_values=pixels(dummy.sam_pixel_values),
                           resized_hw=jnp.tile(dummy.resized_hw, (1, n, 1)), mask_hw=jnp.tile(dummy.mask_hw, (1, n, 1)))
    assert (prompt == img).sum() == n
    if inputs.seg_image is not None:
        inputs = inputs.replace(seg_image=jnp.zeros((1, cfg.seg.max_seg), jnp.int32))
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x))
    return side_by_side("calico_tiny_inference", fn, (_params(module), inputs), None,
                        peak_gflops=ctx.peak_gflops, bandwidth_gbs=ctx.bandwidth_gbs, repeats=ctx.repeats,
                        budget_s=ctx.budget_s, note="forward on one pair (prefill), no PyTorch counterpart")


ITEMS["calico_tiny_inference"] = calico_tiny_inference
