"""A tiny CALICO assembled in PyTorch from the paper's equations, with the first author's parameter names.

Independent of calico_jax's model code: transformers' InstructBLIP (EVA + Q-Former + projection; LAVIS names
``visual_encoder``/``ln_vision``/``Qformer.bert`` in the state dict), transformers' DINOv2 with registers
(torch-hub names), ``torch.nn.MultiheadAttention`` for 𝓐 with a residual, ``nn.ModuleList`` of ``nn.Linear``
for the CAMs, transformers' ``LlamaForCausalLM`` (LoRA on q/v merged into its weights for the forward, stored
as PEFT factors), segment-anything's SAM and GLaMM's ``text_hidden_fcs``. The forward follows Eqs. 1-9 and 3:

    X_global = C(x); I^0 = f_image(Q(q, X_global)); X'_global = X_global + A(X_global, E(x), E(x))
    before decoder layer l: q' = q + f_adaptation_l(h[last prompt token]);
                            h[image i tokens] += f_reintegration_l(Q(q', X'_global_i))
    mask_k = SAM decoder(SAM encoder(x_i), text_hidden_fcs(h_final[position before the k-th [SEG]]))
"""
from __future__ import annotations

import numpy as np
import torch
import transformers

from tests.helpers import randomize

IMAGE = -200


def _to_lavis_qformer(name: str) -> str:
    name = name.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                            ".crossattention.self.")
    return "model.Qformer.bert." + name.replace("embeddings.layernorm.", "embeddings.LayerNorm.")


class TorchCalico:
    def __init__(self, cfg, seed: int = 0):
        from convert.families.lavis_blip2 import hf_model
        from convert.families.sam import build_original
        self.cfg = cfg
        torch.manual_seed(seed)
        self.blip = hf_model(cfg.vision)          # InstructBLIP vision model + Q-Former + projection
        randomize(self.blip, seed)
        with torch.no_grad():                     # EVA has no K bias (LAVIS: q_bias, v_bias only)
            for layer in self.blip.vision_model.encoder.layers:
                d = layer.self_attn.embed_dim
                layer.self_attn.qkv.bias[d:2 * d] = 0
        dv = cfg.dinov2
        self.dino = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            hidden_size=dv.hidden_size, num_hidden_layers=dv.num_hidden_layers,
            num_attention_heads=dv.num_attention_heads, mlp_ratio=int(dv.mlp_ratio), image_size=dv.image_size,
            patch_size=dv.patch_size, num_register_tokens=dv.num_register_tokens, layer_norm_eps=dv.layer_norm_eps,
            attn_implementation="eager")).eval()
        randomize(self.dino, seed + 1)
        e, d, di = cfg.vision.vision.hidden_size, cfg.llm.hidden_size, cfg.vision.qformer.hidden_size
        self.cem = torch.nn.MultiheadAttention(e, cfg.cem.num_heads, kdim=dv.hidden_size, vdim=dv.hidden_size,
                                               batch_first=True).eval()
        self.adapt = torch.nn.ModuleList([torch.nn.Linear(d, di) for _ in cfg.cam.layers])
        self.reint = torch.nn.ModuleList([torch.nn.Linear(di, d) for _ in cfg.cam.layers])
        c = cfg.llm
        self.llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=d, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
            max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
            attn_implementation="eager")).eval()
        self.sam = build_original(cfg.sam).eval()
        out = cfg.sam.prompt_encoder.embed_dim
        self.fcs = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU(),
                                                            torch.nn.Linear(d, out), torch.nn.Dropout(0.0))]).eval()
        for k, m in enumerate((self.cem, self.adapt, self.reint, self.llm, self.sam, self.fcs)):
            randomize(m, seed + 2 + k)
        g = torch.Generator().manual_seed(seed + 9)
        self.lora = {}   # "layers.N.self_attn.q_proj" -> (A [r, in], B [out, r])
        for i, layer in enumerate(self.llm.model.layers):
            for name in c.lora.target_modules:
                w = getattr(layer.self_attn, name).weight
                self.lora[f"layers.{i}.self_attn.{name}"] = (torch.randn(c.lora.r, w.shape[1], generator=g) * 0.1,
                                                             torch.randn(w.shape[0], c.lora.r, generator=g) * 0.1)
        self.base = {k: v.clone() for k, v in self.llm.state_dict().items()}
        with torch.no_grad():   # the forward runs with W + s·B·A
            for key, (a, b) in self.lora.items():
                self.llm.get_submodule("model." + key).weight += c.lora.scaling * (b @ a)

    # --------------------------------------------------------------------------------- the author naming
    def state_dict(self) -> dict[str, np.ndarray]:
        out: dict[str, torch.Tensor] = {}
        for k, v in self.blip.state_dict().items():
            if k.startswith("vision_model."):
                k = k[len("vision_model."):]
                for a, b in (("embeddings.class_embedding", "cls_token"),
                             ("embeddings.position_embedding", "pos_embed"),
                             ("embeddings.patch_embedding", "patch_embed.proj"), ("encoder.layers.", "blocks."),
                             ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.projection", "attn.proj"),
                             ("self_attn.qkv", "attn.qkv")):
                    k = k.replace(a, b)
                if k.startswith("post_layernorm."):
                    out["model.ln_vision." + k.split(".")[-1]] = v
                elif k.endswith("attn.qkv.bias"):
                    d = v.shape[0] // 3
                    out[f"model.visual_encoder.{k[:-len('qkv.bias')]}q_bias"] = v[:d]
                    out[f"model.visual_encoder.{k[:-len('qkv.bias')]}v_bias"] = v[2 * d:]
                else:
                    out["model.visual_encoder." + k] = v
            elif k.startswith("qformer.") and not k.endswith("position_ids"):
                out[_to_lavis_qformer(k[len("qformer."):])] = v
            elif k == "query_tokens":
                out["model.query_tokens"] = v
            elif k.startswith("language_projection."):
                out["model.mm_projector." + k.split(".")[-1]] = v
        dino = self.dino.state_dict()
        for k, v in dino.items():
            k2 = k
            for a, b in (("embeddings.position_embeddings", "pos_embed"), ("embeddings.patch_embeddings.projection",
                         "patch_embed.proj"), ("embeddings.", ""), ("encoder.layer.", "blocks."),
                         ("attention.output.dense", "attn.proj"), ("attention.o_proj", "attn.proj"),
                         ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
                         ("layernorm.", "norm.")):
                k2 = k2.replace(a, b)
            qkv = [".attention.q_proj.", ".attention.k_proj.", ".attention.v_proj."]   # transformers 5 names
            if any(n in k for n in qkv):
                if qkv[0] in k:   # torch-hub: one qkv Linear, rows q | k | v
                    parts = [dino[k.replace(qkv[0], n)] for n in qkv]
                    out["model.dino_model." + k2.replace("attention.q_proj", "attn.qkv")] = torch.cat(parts)
                continue
            out["model.dino_model." + k2] = v
        out.update({"model.extraction_layer." + k: v for k, v in self.cem.state_dict().items()})
        out.update({f"model.adaptive_layers.{k}": v for k, v in self.adapt.state_dict().items()})
        out.update({f"model.reintegration_layers.{k}": v for k, v in self.reint.state_dict().items()})
        out.update(self.base)   # model.embed_tokens / layers / norm, lm_head (LoRA unmerged)
        for key, (a, b) in self.lora.items():
            out[f"base_model.model.model.{key}.lora_A.weight"] = a
            out[f"base_model.model.model.{key}.lora_B.weight"] = b
        out.update({"model.grounding_encoder." + k: v for k, v in self.sam.state_dict().items()})
        out.update({"model.text_hidden_fcs." + k: v for k, v in self.fcs.state_dict().items()})
        return {k: np.ascontiguousarray(v.detach().float().numpy()) for k, v in out.items()}

    # --------------------------------------------------------------------------------------- the forward
    @torch.no_grad()
    def forward(self, ids: list[int], blip, dino, sam, resized, original, last_prompt: int,
                seg_images: list[int]) -> dict[str, np.ndarray]:
        """One sample: ``ids`` with one ``IMAGE`` per image; pixels NCHW per image; ``last_prompt`` (original index).
        -> hidden states at the image tokens leaving each CAM layer, final hidden states, logits, masks."""
        nq = self.cfg.vision.num_query_tokens
        x_global = self.blip.vision_model(pixel_values=blip).last_hidden_state                    # Eq. 4
        q = self.blip.query_tokens

        def qformer(queries, images):
            no_text = torch.zeros((len(queries), 0), dtype=torch.long)   # the paper's Q(q, X): queries only
            return self.blip.qformer(input_ids=no_text, query_embeds=queries,
                                     encoder_hidden_states=images).last_hidden_state[:, :nq]

        i0 = self.blip.language_projection(qformer(q.expand(len(blip), -1, -1), x_global))         # Eqs. 1-2
        semantic = self.dino(pixel_values=dino).last_hidden_state                                  # Eq. 5
        x_fused = x_global + self.cem(x_global, semantic, semantic, need_weights=False)[0]        # Eq. 6
        embed = self.llm.model.embed_tokens
        pieces, image_pos, pos, k = [], [], 0, 0
        expanded = []
        for t in ids:
            expanded.append(pos)
            if t == IMAGE:
                pieces.append(i0[k])
                image_pos.append(list(range(pos, pos + nq)))
                pos, k = pos + nq, k + 1
            else:
                pieces.append(embed(torch.tensor([t])))
                pos += 1
        h0 = torch.cat(pieces)[None]
        t_last = expanded[last_prompt]
        captured, handles = {}, []
        for j, layer in enumerate(self.cfg.cam.layers):
            def pre(module, args, kwargs, j=j):
                h = (args[0] if args else kwargs["hidden_states"]).clone()
                q2 = q + self.adapt[j](h[0, t_last])[None, None]                                   # Eq. 7
                x_embed = qformer(q2.expand(len(blip), -1, -1), x_fused)                          # Eq. 8
                upd = self.reint[j](x_embed)                                                       # Eq. 9
                for i, p in enumerate(image_pos):
                    h[0, p] += upd[i]
                return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

            def post(module, args, output, layer=layer):
                out = output[0] if isinstance(output, tuple) else output
                captured[layer] = out[0, sum(image_pos, [])].numpy()
            handles.append(self.llm.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(self.llm.model.layers[layer].register_forward_hook(post))
        try:
            final = self.llm.model(inputs_embeds=h0, attention_mask=torch.ones(h0.shape[:2], dtype=torch.long),
                                   use_cache=False).last_hidden_state
        finally:
            for hd in handles:
                hd.remove()
        logits = self.llm.lm_head(final)
        segs = [expanded[p] for p, t in enumerate(ids) if t == self.cfg.seg.token_id]
        emb = self.fcs[0](final[0, [s - 1 for s in segs]])    # the state before each [SEG] (GLaMM/LISA)
        from convert.families.sam import original_prompt
        image_emb = self.sam.image_encoder(sam)
        masks = []
        for e, i in zip(emb, seg_images, strict=True):
            sparse, dense = original_prompt(self.sam.prompt_encoder, text_embeds=e[None, None])
            low, _ = self.sam.mask_decoder(image_embeddings=image_emb[i:i + 1],
                                           image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                           multimask_output=False)
            masks.append(self.sam.postprocess_masks(low, tuple(resized[i]), tuple(original[i]))[0, 0].numpy())
        return {"cam_hidden": captured, "final": final[0].numpy(), "logits": logits[0].numpy(), "masks": masks}
