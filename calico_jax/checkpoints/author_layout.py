"""The first author's PyTorch naming of a CALICO checkpoint, both ways (one table for ``convert`` and ``export``).

The names come from the first author's public multi-image LISA baseline (``kanguyen-vn/LISA``:
``train_qformer.py``, ``model/LISA_qformer.py``), which carries CALICO's modules under the LLaVA/GLaMM
``model.`` prefix: ``Qformer`` (LAVIS ``BertModel``, so ``Qformer.bert.*``), ``query_tokens``,
``visual_encoder`` + ``ln_vision`` (LAVIS EVA ViT-g), ``mm_projector`` (f_image), ``dino_model``
(a torch-hub DINOv2), ``extraction_layer`` (𝓐), ``adaptive_layers.{i}`` (f_adaptation of the i-th CAM),
``reintegration_layers.{i}`` (f_reintegration), ``grounding_encoder`` (SAM) and ``text_hidden_fcs``;
the LLaMA decoder is ``model.{embed_tokens,layers,norm}`` + ``lm_head``. What each module *is* (an
``nn.MultiheadAttention``, a ``ModuleList`` of ``nn.Linear``) is our reading of those names: the author code
that builds them is not public.

Each :class:`NameRule` pairs an author key template with our *canonical* key (the PyTorch-style names the
converter maps onto the Flax tree, see ``convert/mapping.py``); ``{name}`` placeholders match the regex in
``groups`` (defaults: ``i``/``c`` digits, ``w`` weight|bias, ``k`` 1|2). A rule with several canonical keys is a
fused tensor (rows concatenated in that order: DINOv2's ``qkv``, ``nn.MultiheadAttention``'s ``in_proj_*``).
``cam.{c}`` stands for the c-th CAM (``cam_{cam.layers[c]}``). ``model.cam_query_tokens`` (the CAMs' own
copy of q, ``cam.queries="shared"``) is ours: the author code trains ``query_tokens`` itself.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

_DEFAULT_GROUPS = {"i": r"\d+", "c": r"\d+", "w": r"weight|bias", "k": r"1|2"}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclasses.dataclass(frozen=True)
class NameRule:
    author: str
    canonical: tuple[str, ...]
    groups: tuple[tuple[str, str], ...] = ()
    label: str = ""

    def _regex(self, template: str) -> re.Pattern:
        groups = {**_DEFAULT_GROUPS, **dict(self.groups)}
        out, pos = [], 0
        for m in _PLACEHOLDER.finditer(template):
            out.append(re.escape(template[pos:m.start()]))
            out.append(f"(?P<{m[1]}>{groups[m[1]]})")
            pos = m.end()
        out.append(re.escape(template[pos:]))
        return re.compile("".join(out))

    @property
    def author_regex(self) -> re.Pattern:
        return self._regex(self.author)

    def canonical_regexes(self) -> list[re.Pattern]:
        return [self._regex(c) for c in self.canonical]

    def forward_target(self) -> str:
        """The target in ``convert/families/calico.py``'s mini-language (``\\g<name>``, ``@chunk``, ``<cam:N>``)."""
        subst = [_PLACEHOLDER.sub(r"\\g<\1>", c) for c in self.canonical]
        subst = [re.sub(r"^cam\.\\g<c>\.", r"<cam:\\g<c>>.", s) for s in subst]
        if len(subst) == 1:
            return subst[0]
        n = len(subst)
        return "|".join(f"{s}@chunk({j},{n})" for j, s in enumerate(subst))


def R(author: str, *canonical: str, label: str = "", **groups: str) -> NameRule:  # noqa: N802 (a table row)
    return NameRule(author, canonical, tuple(groups.items()), label)


W = "{w}"
QB, VE, DM = "model.Qformer.bert.", "model.visual_encoder.", "model.dino_model."
RULES: list[NameRule] = [
    # Q-Former (LAVIS BertModel names)
    R(QB + "encoder.layer.{i}.{a}.self.{p}." + W, "qformer.encoder.layer.{i}.{a}.attention.{p}." + W,
      a="attention|crossattention", p="query|key|value", label="Q-Former"),
    R(QB + "encoder.layer.{i}.{m}.{n}." + W, "qformer.encoder.layer.{i}.{m}.{n}." + W, label="Q-Former",
      m=r"attention\.output|crossattention\.output|intermediate_query|intermediate|output_query|output",
      n="dense|LayerNorm"),
    R(QB + "embeddings.LayerNorm." + W, "qformer.embeddings.layernorm." + W, label="Q-Former"),
    R(QB + "embeddings.LayerNorm." + W, "qformer.layernorm." + W, label="Q-Former"),   # BLIP-2 layout (export)
    R(QB + "embeddings.{e}.weight", "qformer.embeddings.{e}.weight", e="word_embeddings|position_embeddings",
      label="Q-Former instruction embeddings"),
    R("model.query_tokens", "query_tokens", label="query tokens q"),
    # EVA ViT-g (LAVIS names) + ln_vision
    R(VE + "cls_token", "vision_model.embeddings.class_embedding", label="EVA ViT"),
    R(VE + "pos_embed", "vision_model.embeddings.position_embedding", label="EVA ViT"),
    R(VE + "patch_embed.proj." + W, "vision_model.embeddings.patch_embedding." + W, label="EVA ViT"),
    R(VE + "blocks.{i}.norm{k}." + W, "vision_model.encoder.layers.{i}.layer_norm{k}." + W, label="EVA ViT"),
    R(VE + "blocks.{i}.attn.qkv.weight", "vision_model.encoder.layers.{i}.self_attn.qkv.weight", label="EVA ViT"),
    R(VE + "blocks.{i}.attn.{b}", "vision_model.encoder.layers.{i}.self_attn.{b}", b="q_bias|v_bias",
      label="EVA ViT"),
    R(VE + "blocks.{i}.attn.proj." + W, "vision_model.encoder.layers.{i}.self_attn.projection." + W,
      label="EVA ViT"),
    R(VE + "blocks.{i}.mlp.{f}." + W, "vision_model.encoder.layers.{i}.mlp.{f}." + W, f="fc1|fc2", label="EVA ViT"),
    R("model.ln_vision." + W, "vision_model.post_layernorm." + W, label="ln_vision"),
    R("model.mm_projector." + W, "language_projection." + W, label="f_image"),
    # DINOv2 (torch-hub names)
    R(DM + "{t}", "dinov2.embeddings.{t}", t="cls_token|mask_token|register_tokens", label="DINOv2"),
    R(DM + "pos_embed", "dinov2.embeddings.position_embeddings", label="DINOv2"),
    R(DM + "patch_embed.proj." + W, "dinov2.embeddings.patch_embeddings.projection." + W, label="DINOv2"),
    R(DM + "blocks.{i}.norm{k}." + W, "dinov2.encoder.layer.{i}.norm{k}." + W, label="DINOv2"),
    R(DM + "blocks.{i}.attn.qkv." + W, *(f"dinov2.encoder.layer.{{i}}.attention.attention.{p}.{{w}}"
                                          for p in ("query", "key", "value")), label="DINOv2"),
    R(DM + "blocks.{i}.attn.proj." + W, "dinov2.encoder.layer.{i}.attention.output.dense." + W, label="DINOv2"),
    R(DM + "blocks.{i}.ls{k}.gamma", "dinov2.encoder.layer.{i}.layer_scale{k}.lambda1", label="DINOv2"),
    R(DM + "blocks.{i}.mlp.{f}." + W, "dinov2.encoder.layer.{i}.mlp.{f}." + W, f="fc1|fc2", label="DINOv2"),
    R(DM + "blocks.{i}.mlp.w12." + W, "dinov2.encoder.layer.{i}.mlp.weights_in." + W, label="DINOv2"),
    R(DM + "blocks.{i}.mlp.w3." + W, "dinov2.encoder.layer.{i}.mlp.weights_out." + W, label="DINOv2"),
    R(DM + "norm." + W, "dinov2.layernorm." + W, label="DINOv2"),
    # CEM 𝓐 as nn.MultiheadAttention (kdim != embed_dim: separate q/k/v weights, one in_proj_bias)
    R("model.extraction_layer.in_proj_weight", "cem.q_proj.weight", "cem.k_proj.weight", "cem.v_proj.weight",
      label="CEM (MultiheadAttention)"),   # before the separate weights: nn.MultiheadAttention's kdim == embed_dim
    R("model.extraction_layer.{p}_proj_weight", "cem.{p}_proj.weight", p="q|k|v", label="CEM (MultiheadAttention)"),
    R("model.extraction_layer.in_proj_bias", "cem.q_proj.bias", "cem.k_proj.bias", "cem.v_proj.bias",
      label="CEM (MultiheadAttention)"),
    R("model.extraction_layer.out_proj." + W, "cem.out_proj." + W, label="CEM (MultiheadAttention)"),
    # CAMs
    R("model.adaptive_layers.{c}." + W, "cam.{c}.f_adaptation." + W, label="CAM f_adaptation"),
    R("model.reintegration_layers.{c}." + W, "cam.{c}.f_reintegration." + W, label="CAM f_reintegration"),
    R("model.cam_query_tokens", "cam_query_tokens", label="CAM queries (calico_jax)"),
    # SAM, [SEG] projection, LLaMA
    R("model.grounding_encoder.{p}.{rest}", "sam.{p}.{rest}", p="image_encoder|prompt_encoder|mask_decoder",
      rest=r".+", label="SAM"),
    R("model.text_hidden_fcs.{rest}", "text_hidden_fcs.{rest}", rest=r".+", label="f_segmentation"),
    R("model.{m}.{rest}", "llm.model.{m}.{rest}", m="embed_tokens|norm|layers", rest=r".+", label="LLaMA"),
    R("lm_head.weight", "llm.lm_head.weight", label="LLaMA"),
]
# PEFT adapter naming of the LoRA factors (adapter_model.safetensors).
PEFT_PREFIX = "base_model.model."
ADAPTER_DIR = "adapter"


# ------------------------------------------------------------------------------- Flax <-> canonical (torch layout)
def canonical_from_flax(path: tuple[str, ...]) -> str:
    """``("llm", "model", "layers_3", "mlp", "fc1", "kernel")`` -> ``llm.model.layers.3.mlp.fc1.weight``
    (``cam_{l}`` stays: CAMs are named by layer; every other ``_N`` suffix is a ModuleList index)."""
    parts = []
    for p in path[:-1]:
        if not re.fullmatch(r"cam_\d+", p):
            p = re.sub(r"_(\d+)", r".\1", p) if re.search(r"_\d+$", p) else p
        parts.append(p)
    leaf = path[-1]
    return ".".join(parts + ["weight" if leaf in ("kernel", "scale", "embedding") else leaf])


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """Inverse of ``convert.mapping.to_flax``: Linear kernels transposed, conv kernels HWIO -> OIHW."""
    if leaf == "kernel" and array.ndim == 2:
        return np.ascontiguousarray(array.T)
    if leaf == "kernel" and array.ndim == 4:
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    return np.asarray(array)


def to_author(canonical: dict[str, np.ndarray], cam_layers: tuple[int, ...]) -> tuple[dict[str, np.ndarray], list]:
    """Canonical tensors -> author-named tensors (fused tensors concatenated); returns (tensors, unnamed keys)."""
    index = {layer: i for i, layer in enumerate(cam_layers)}
    pending = {re.sub(r"^cam_(\d+)\.", lambda m: f"cam.{index[int(m[1])]}.", k): v for k, v in canonical.items()}
    out: dict[str, np.ndarray] = {}
    for rule in RULES:
        regexes = rule.canonical_regexes()
        for key in [k for k in pending if regexes[0].fullmatch(k)]:
            groups = regexes[0].fullmatch(key).groupdict()
            parts = [_PLACEHOLDER.sub(lambda m, g=groups: g[m[1]], c) for c in rule.canonical]
            if not all(p in pending for p in parts):
                continue   # e.g. MultiheadAttention's q/k/v weights of different widths: the separate rule
            if len(parts) > 1 and rule.author.endswith("in_proj_weight") and \
                    len({pending[p].shape for p in parts}) > 1:
                continue
            name = _PLACEHOLDER.sub(lambda m, g=groups: g[m[1]], rule.author)
            out[name] = np.concatenate([pending.pop(p) for p in parts], 0) if len(parts) > 1 else pending.pop(key)
    return out, sorted(pending)
