"""CALICO: multi-image part co-segmentation from BLIP-2 vision, DINOv2 correspondence, Vicuna and SAM.

One batch through :class:`Calico` (shapes for B samples of at most N images, T prompt tokens):

1. 𝓘 per image: X_global = 𝓒(image) (EVA ViT, frozen), X_embed = 𝓠(q, X_global) (frozen Q-Former),
   I^0 = f_image(X_embed) (frozen ``language_projection``): S_I (32) visual tokens per image. This is the
   ``image_path="qformer"`` part; :mod:`calico_jax.models.image_paths` holds it and its alternatives.
2. 𝓔 + CEM (:mod:`calico_jax.models.cem`): X'_global = 𝓐(X_global, 𝓔(image)), used only by the CAMs.
3. Splicing: each image placeholder (``image_token_index``, -200) of ``input_ids`` is widened to its
   image's S_I tokens; the expanded sequence has static length T' = T + N·(S_I - 1) (slots of absent
   images stay empty: attention mask 0, label -100, at the end). ``image_positions`` [B, N, S_I] records
   where image i's tokens sit; image i of a sample is its i-th placeholder.
4. 𝓜 with CAMs (:mod:`calico_jax.models.cam`) as LLaMA hooks before the configured decoder layers.
5. [SEG] routing: the k-th ``[SEG]`` of a sample (at most ``seg.max_seg``, extras are counted in
   ``num_dropped_seg`` and ignored) goes to the image named by the identifier tokens that follow it
   (``seg.identifier_ids[i]`` = the ids of " (IMAGE{i+1})" after ``[SEG]``), or to ``seg_image`` when
   the caller gives it (host-side routing, e.g. ``TokenizedSample.seg_images``). Rule for a [SEG]
   without a valid identifier (none matches, or it names an absent image): ``unrouted="drop"``
   (default) gives it no mask (``seg_valid`` False); ``"first"`` sends it to image 0. Either way it
   is counted in ``num_unrouted_seg``. The hidden state used is the one *before* the [SEG]
   (GLaMM/LISA, default ``hidden_position="before"``) or at it (``"at"``), located in the expanded
   sequence (never a hard-coded offset), after the final RMSNorm.
6. f_segmentation (GLaMM ``text_hidden_fcs``: Linear-ReLU-Linear to the SAM prompt width, or one
   Linear) -> sparse prompt; SAM image embeddings (frozen 𝓖, once per image) -> mask decoder 𝓓
   (dense prompt = no-mask embedding, one mask: multimask off) -> low-res logits.
7. Post-processing with static shapes: GLaMM's ``postprocess_masks`` (bilinear to img_size², crop to
   the resized size (h_r, w_r), bilinear to the original (H, W)) is linear in the logits, so it is
   applied as ``A_h · low_res · A_wᵀ`` with interpolation matrices built from the *traced* sizes. Masks
   come out at the fixed ``preprocess.mask_size`` (H_pad = W_pad) with the image at the top-left; pixels
   outside (H, W) are 0 and ``mask_hw`` [B, M, 2] says which region is valid.

Parameter names: ``vision_model``/``qformer``/``query_tokens``/``language_projection`` as in HF
InstructBLIP, ``dinov2``, ``cem``, ``cam_{l}``, ``cam_query_tokens``, ``llm`` (HF LLaMA layout),
``sam`` (segment-anything layout) and ``text_hidden_fcs_0_0``/``text_hidden_fcs_0_2`` (GLaMM's
``text_hidden_fcs.0.0``/``.0.2`` under the generic key rule).

The config (:class:`CalicoConfig`) is the whole model: architecture, ablation switches, the pre-processing its
inputs need (``preprocess``) and each tower's remat policy (the loss and the trainable patterns are the training
recipe, ``ExperimentConfig.recipe``); ``docs/paper_map.md`` maps every paper symbol to its code and every choice the
paper leaves open to the switch that decides it (here: by default the Q-Former gets no instruction text -- queries
only, the CAMs carry the prompt; ``qformer_text_input`` feeds it the prompt tokens ``qformer_input_ids`` [B, T_q] in
Eq. 2 as InstructBLIP does, the CAMs' Eq. 8 stays queries-only; X_global is EVA's post-layernorm output, all 1 + N
tokens; DINOv2 runs at ``preprocess.dinov2_size``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calico_jax.core.tokens import IGNORE_INDEX
from calico_jax.models import image_paths, layers
from calico_jax.models.blip2 import query_tokens_shape
from calico_jax.models.calico_config import REMAT_TOWERS, CalicoConfig  # noqa: F401 (re-export)
from calico_jax.models.calico_layout import expand_sequence, postprocess_masks
from calico_jax.models.cam import CorrespondenceAdaptation, scatter_image_tokens
from calico_jax.models.cem import CorrespondenceExtraction, select_semantic
from calico_jax.models.dinov2 import Dinov2
from calico_jax.models.glamm_parts import apply_seg_projection, seg_projection
from calico_jax.models.inputs import CalicoInputs
from calico_jax.models.llama import KVCache, LlamaForCausalLM, LlamaOutput, last_token_index
from calico_jax.models.sam import Sam
from calico_jax.models.seg_routing import route_segs, seg_hidden_index


# ----------------------------------------------------------------------------- the model
class Calico(nn.Module):
    """See the module docstring. ``__call__(inputs, labels=None)`` and ``prefill(inputs, ...)`` take one
    :class:`~calico_jax.models.inputs.CalicoInputs` (the batch contract: field names, shapes and meanings in
    :mod:`calico_jax.models.inputs`); ``__call__`` reads input_ids, attention_mask, pixel_values, dino_pixel_values,
    sam_pixel_values or sam_image_embeddings, resized_hw, mask_hw and the optional image_valid, prompt_lengths,
    seg_image and Q-Former text; ``labels`` [B, T] (unshifted, -100 ignored) give the expanded label sequence and
    the last prompt token.
    """

    config: CalicoConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg, v = self.config, self.config.vision
        # 𝓘: the configured image path's submodules, set on this module under their top-level names
        # (vision_model/qformer/query_tokens/language_projection, linear_projection or vision_tower/mm_projector).
        image_path = image_paths.for_config(cfg)
        image_path.setup(self)
        shape = query_tokens_shape(v)
        if cfg.cem.enabled:
            self.cem = CorrespondenceExtraction(cfg.cem, self.dtype)
            if cfg.cem.use_dinov2:
                self.dinov2 = Dinov2(cfg.dinov2, self.dtype)
        # CAM queries start as a copy of the Q-Former's q (the init closure reads its value; only image paths
        # that offer CAMs have one, and the config allows CAM layers only with those).
        copy_q = layers.param_init(lambda *_: jnp.asarray(image_path.cam_parts(self).query_tokens),
                                   (None, "length", "embed"))
        if cfg.cam.layers and cfg.cam.queries == "shared":
            self.cam_query_tokens = self.param("cam_query_tokens", copy_q, shape)
        elif cfg.cam.queries == "per_cam":
            self.cam_queries = {layer: self.param(f"cam_query_tokens_{layer}", copy_q, shape)
                                for layer in cfg.cam.layers}
        self.cam = {layer: CorrespondenceAdaptation(cfg.llm.hidden_size, v.qformer.hidden_size, cfg.cam.zero_init,
                                                    self.dtype) for layer in cfg.cam.layers}
        self.llm = LlamaForCausalLM(cfg.decoder, self.dtype)   # CAM layers split a scanned decoder
        self.sam = Sam(cfg.sam, self.dtype)
        self.text_hidden_fcs_0 = seg_projection(cfg.llm.hidden_size, cfg.sam.prompt_encoder.embed_dim,
                                                cfg.seg.projection, self.dtype)

    # --- pieces (each usable alone through ``apply(..., method=...)``)
    def encode_images(self, pixel_values: jax.Array, qformer_input_ids: jax.Array | None = None,
                      qformer_attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """𝓘 on [n, H, W, 3] -> (X_global [n, S_C, D_C], I^0 = f_image(𝓠(q, X_global[, text])) [n, S_I, D]);
        the instruction tokens [n, T_q] only with ``qformer_text_input`` (InstructBLIP). The configured part of
        :mod:`calico_jax.models.image_paths` (the linear / clip_mlp paths: their own tokens instead)."""
        return image_paths.for_config(self.config).encode(self, pixel_values, qformer_input_ids,
                                                          qformer_attention_mask)

    def fuse(self, x_global: jax.Array, dino_pixel_values: jax.Array | None) -> jax.Array:
        """CEM: X'_global = 𝓐(X_global, X_semantic = 𝓔(image)); X_global itself without a CEM."""
        cfg = self.config.cem
        if not cfg.enabled:
            return x_global
        if not cfg.use_dinov2:
            return self.cem(x_global, x_global)
        semantic = select_semantic(self.dinov2(dino_pixel_values, output_hidden_states=cfg.dinov2_layer >= 0),
                                   cfg, 1 + self.config.dinov2.num_register_tokens)
        return self.cem(x_global, semantic)

    def cam_queries_for(self, layer: int) -> jax.Array:
        mode = self.config.cam.queries
        return {"shared": lambda: self.cam_query_tokens, "per_cam": lambda: self.cam_queries[layer],
                "base": lambda: image_paths.for_config(self.config).cam_parts(self).query_tokens}[mode]()

    def cam_update(self, layer: int, hidden: jax.Array, last_prompt_index: jax.Array, x_fused: jax.Array,
                   image_positions: jax.Array, image_valid: jax.Array) -> jax.Array:
        """CAM at ``layer`` (Eqs. 7-9): hidden [B, T', D]; x_fused = X'_global [B, N, S_C, D_C];
        image_positions [B, N, S_I]; image_valid [B, N]."""
        b, n = image_valid.shape
        cam = self.cam[layer]
        t = hidden[jnp.arange(b), last_prompt_index]                                    # t^l [B, D]
        q = cam.guided_queries(self.cam_queries_for(layer), t)                         # q' [B, S_I, D_I]
        q = jnp.broadcast_to(q[:, None], (b, n, *q.shape[1:])).reshape(b * n, *q.shape[1:])
        qformer = image_paths.for_config(self.config).cam_parts(self).qformer
        x_embed = qformer(q, x_fused.reshape(b * n, *x_fused.shape[2:]))[:, :q.shape[1]]
        upd = cam(x_embed).reshape(b, n, q.shape[1], -1)
        return scatter_image_tokens(hidden, upd, image_positions, image_valid)

    def project_seg(self, hidden: jax.Array) -> jax.Array:
        """f_segmentation: LLM hidden states [..., D] -> SAM prompt embeddings [..., C]."""
        return apply_seg_projection(self.text_hidden_fcs_0, hidden, self.dtype)

    def embed_inputs(self, inputs: CalicoInputs, *, labels=None) -> dict[str, jax.Array]:
        """Steps 1-3: the LLM's input embeddings over the expanded sequence and what the CAMs need (reads
        input_ids, attention_mask, pixel_values, dino_pixel_values, image_valid, prompt_lengths, Q-Former text).

        -> ``embeds`` [B, T', D], ``mask`` [B, T'], ``newpos`` [B, T] (original -> expanded position),
        ``text_target``, ``image_positions`` [B, N, S_I], ``image_valid`` [B, N], ``last_prompt_index`` [B]
        (expanded) and ``x_fused`` [B, N, S_C, D_C] (X'_global; ``None`` without CAMs)."""
        cfg, input_ids, pixel_values = self.config, inputs.input_ids, inputs.pixel_values
        b, n = pixel_values.shape[:2]
        nq = cfg.num_image_tokens
        rows = jnp.arange(b)[:, None]

        q_ids = q_mask = None
        if cfg.qformer_text_input and inputs.qformer_input_ids is not None:   # one instruction per sample, all images
            q_ids = jnp.repeat(jnp.asarray(inputs.qformer_input_ids, jnp.int32), n, axis=0)
            q_mask = (None if inputs.qformer_attention_mask is None else
                      jnp.repeat(inputs.qformer_attention_mask, n, axis=0))
        x_global, image_tokens = self.encode_images(pixel_values.reshape(b * n, *pixel_values.shape[2:]), q_ids,
                                                    q_mask)
        newpos, text_target, image_positions, has_image, t_exp = expand_sequence(
            input_ids, cfg.image_token_index, n, nq)
        valid_img = has_image if inputs.image_valid is None else has_image & inputs.image_valid.astype(bool)
        image_positions = jnp.where(valid_img[..., None], image_positions, t_exp)

        ids = jnp.where(input_ids == cfg.image_token_index, 0, input_ids)
        embeds = jnp.zeros((b, t_exp, cfg.llm.hidden_size), self.dtype)
        embeds = embeds.at[rows, text_target].set(self.llm.embed(ids).astype(self.dtype), mode="drop")
        embeds = embeds.at[rows, image_positions.reshape(b, -1)].set(
            image_tokens.reshape(b, n * nq, -1).astype(self.dtype), mode="drop")
        attention_mask, dino = inputs.attention_mask, inputs.dino_pixel_values
        mask = jnp.zeros((b, t_exp), bool).at[rows, text_target].set(attention_mask.astype(bool), mode="drop")
        mask = mask.at[rows, image_positions.reshape(b, -1)].set(True, mode="drop")

        # Last prompt token (original index) -> expanded position.
        if inputs.prompt_lengths is not None:
            last = jnp.asarray(inputs.prompt_lengths, jnp.int32) - 1
        elif labels is not None:
            target = labels != IGNORE_INDEX
            last = jnp.where(jnp.any(target, 1), jnp.argmax(target, 1) - 1, last_token_index(attention_mask))
        else:
            last = last_token_index(attention_mask)
        last_prompt_index = jnp.take_along_axis(newpos, jnp.maximum(last, 0)[:, None], 1)[:, 0]

        x_fused = None
        if cfg.cam.layers:
            x_fused = self.fuse(x_global, None if dino is None else dino.reshape(b * n, *dino.shape[2:]))
            x_fused = x_fused.reshape(b, n, *x_fused.shape[1:])
        return {"embeds": embeds, "mask": mask, "newpos": newpos, "text_target": text_target,
                "image_positions": image_positions, "image_valid": valid_img,
                "last_prompt_index": last_prompt_index, "x_fused": x_fused}

    def cam_hooks(self, embedded: dict[str, jax.Array]) -> dict:
        """LLaMA hooks {layer: CAM} over the :meth:`embed_inputs` result (empty without CAMs)."""
        return {layer: (lambda h, lpi, layer=layer: self.cam_update(
            layer, h, lpi, embedded["x_fused"], embedded["image_positions"], embedded["image_valid"]))
            for layer in self.config.cam.layers}

    def seg_low_res_masks(self, seg_emb: jax.Array, image_embeddings: jax.Array) -> jax.Array:
        """Step 6 for K [SEG]s: prompt embeddings f_segmentation(h) [K, C] and each one's SAM image embedding
        [K, h, w, C] -> low-res mask logits [K, 4h, 4w] (one mask per prompt: multimask off)."""
        sparse, dense = self.sam.encode_prompts(text_embeds=seg_emb[:, None])
        low_res, _ = self.sam.decode_masks(image_embeddings, self.sam.dense_pe(), sparse, dense, False)
        return low_res[:, 0]

    def sam_embeddings(self, sam_pixel_values: jax.Array) -> jax.Array:
        """Frozen 𝓖 on [B, N, S, S, 3] -> [B, N, h, w, C]."""
        b, n = sam_pixel_values.shape[:2]
        flat = sam_pixel_values.reshape(b * n, *sam_pixel_values.shape[2:])
        return self.sam.image_embeddings(flat).reshape(b, n, *sam_image_embeddings_shape(self.config))

    # --- generation (driven by calico_jax.inference.generate.decode_loop; the KV cache carries the CAMs' effect)
    def prefill(self, inputs: CalicoInputs, *, max_new_tokens: int, cache_dtype: Any = None) -> LlamaOutput:
        """Steps 1-4 on a LEFT-padded prompt (every row of the batch has the same image count, so all end
        at the last expanded slot T'-1, which the CAMs read as t^l) into a fresh KV cache with room for
        ``max_new_tokens`` -> last-position logits, the prompt's final hidden states and the cache (reads what
        :meth:`embed_inputs` reads)."""
        inp = self.embed_inputs(inputs)
        b, t = inp["embeds"].shape[:2]
        cache = KVCache.init(self.config.decoder, b, t + max_new_tokens, cache_dtype or self.dtype)
        return self.llm(attention_mask=inp["mask"], inputs_embeds=inp["embeds"], cache=cache,
                        hooks=self.cam_hooks(inp) or None, last_prompt_index=jnp.full((b,), t - 1, jnp.int32),
                        last_logits_only=True)

    def decode_step(self, tokens: jax.Array, cache: KVCache) -> LlamaOutput:
        """One generated token per row [B] through the LLM after :meth:`prefill` (no hooks: the cache holds
        the CAM-updated prompt)."""
        return self.llm(tokens[:, None], jnp.ones((tokens.shape[0], 1), bool), cache=cache, last_logits_only=True)

    # --- the full forward
    def __call__(self, inputs: CalicoInputs, *, labels=None, deterministic: bool = True) -> dict[str, jax.Array]:
        cfg = self.config
        b = inputs.pixel_values.shape[0]
        rows = jnp.arange(b)[:, None]
        inp = self.embed_inputs(inputs, labels=labels)
        t_exp, valid_img, newpos = inp["embeds"].shape[1], inp["image_valid"], inp["newpos"]
        out = self.llm(attention_mask=inp["mask"], inputs_embeds=inp["embeds"], hooks=self.cam_hooks(inp) or None,
                       last_prompt_index=inp["last_prompt_index"], deterministic=deterministic)

        result = {"logits": out.logits, "hidden_states": out.hidden_states, "attention_mask": inp["mask"],
                  "image_positions": inp["image_positions"],
                  "image_valid": valid_img, "last_prompt_index": inp["last_prompt_index"]}
        if labels is not None:
            result["labels"] = jnp.full((b, t_exp), IGNORE_INDEX, jnp.int32).at[rows, inp["text_target"]].set(
                labels.astype(jnp.int32), mode="drop")

        # [SEG] -> image, hidden state -> prompt -> SAM mask.
        route = route_segs(inputs.input_ids, cfg.seg, jnp.sum(valid_img, 1), inputs.seg_image)
        seg_pos = seg_hidden_index(jnp.take_along_axis(newpos, jnp.maximum(route["position"], 0), 1),
                                   cfg.seg.hidden_position)   # teacher-forced: hidden[p] is token p's state
        seg_pos = jnp.clip(seg_pos, 0, t_exp - 1)
        seg_emb = self.project_seg(out.hidden_states[rows, seg_pos])                     # [B, M, C]
        sam_image_embeddings = inputs.sam_image_embeddings
        if sam_image_embeddings is None:
            sam_image_embeddings = self.sam_embeddings(inputs.sam_pixel_values)
        m = cfg.seg.max_seg
        per_seg = sam_image_embeddings[rows, route["image"]].reshape(b * m, *sam_image_embeddings.shape[2:])
        low_res = self.seg_low_res_masks(seg_emb.reshape(b * m, -1), per_seg)
        gather = lambda x: jnp.asarray(x)[rows, route["image"]].reshape(b * m, 2)  # noqa: E731
        masks = postprocess_masks(low_res, cfg.sam.image_encoder.img_size, gather(inputs.resized_hw),
                                  gather(inputs.mask_hw), cfg.mask_size)
        result.update(mask_logits=masks.reshape(b, m, *cfg.mask_size), mask_hw=gather(inputs.mask_hw).reshape(b, m, 2),
                      seg_valid=route["valid"], seg_image=route["image"], seg_positions=seg_pos,
                      seg_embeddings=seg_emb, num_unrouted_seg=route["num_unrouted"],
                      num_dropped_seg=route["num_dropped"])
        return result

    def dummy_inputs(self) -> CalicoInputs:
        """One sample, one image: ``<s> <image> [SEG] (IMAGE1)``; tiny pixel arrays (SAM at its size)."""
        cfg = self.config
        ident = list(cfg.seg.identifier_ids[0]) if cfg.seg.identifier_ids else []
        ids = jnp.asarray([[cfg.llm.bos_token_id, cfg.image_token_index, cfg.seg.token_id] + ident], jnp.int32)
        p, dp, s = image_paths.for_config(cfg).pixel_size(cfg), cfg.dinov2.patch_size, cfg.sam.image_encoder.img_size
        return CalicoInputs(
            input_ids=ids, attention_mask=jnp.ones_like(ids), pixel_values=jnp.zeros((1, 1, p, p, 3)),
            dino_pixel_values=jnp.zeros((1, 1, dp, dp, 3)), sam_pixel_values=jnp.zeros((1, 1, s, s, 3)),
            resized_hw=jnp.full((1, 1, 2), s, jnp.int32), mask_hw=jnp.full((1, 1, 2), s, jnp.int32),
            seg_image=None if ident else jnp.zeros((1, cfg.seg.max_seg), jnp.int32),
            qformer_input_ids=jnp.zeros((1, 1), jnp.int32) if cfg.qformer_text_input else None)


def sam_image_embeddings_shape(cfg: CalicoConfig) -> tuple[int, int, int]:
    h, w = cfg.sam.prompt_encoder.image_embedding_size
    return h, w, cfg.sam.prompt_encoder.embed_dim
