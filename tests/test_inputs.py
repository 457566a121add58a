"""The CALICO batch contract (calico_jax.models.inputs): the pipeline emits exactly the fields, shapes and dtypes
``spec`` gives for the tiny config, ``split`` takes them without renaming, and ``spec`` covers every field the
model reads (found by tracing the forward with a recording view of its inputs)."""
from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from calico_jax.checkpoints import converted as pretrained
from calico_jax.data.pipeline import Process
from calico_jax.models import inputs as contract
from calico_jax.train.calico_task import CalicoTask
from calico_jax.train.config import load

ROOT = Path(__file__).resolve().parents[1]


def tiny_task(**model):
    cfg = load(ROOT / "configs/tiny.py")
    cfg = cfg.replace(model=cfg.model.replace(**model))
    return CalicoTask(cfg, plan_only=True)


def decoded(rng, sizes, num_segs):
    """What Decode/Augment hand to Process: token ids, images at their sizes, one mask per [SEG]."""
    ids = [1, -200, 7] + [-200] * (len(sizes) - 1) + [8, 9, 2]
    return {"index": 3, "task": 1, "input_ids": ids, "labels": [-100] * (len(ids) - 3) + ids[-3:],
            "images": [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes],
            "masks": [rng.random(sizes[0]) > 0.5 for _ in range(num_segs)], "seg_image": [0] * num_segs}


def test_pipeline_emits_the_spec():
    task = tiny_task()
    rng = np.random.default_rng(0)
    proc = Process(task.pcfg, pad_id=0)
    rows = [proc.map(decoded(rng, [(30, 41), (52, 20)], 2)), proc.map(decoded(rng, [(33, 33)], 1))]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}   # what grain's batch() does
    n, t = task.cfg.data.max_images, task.cfg.data.max_tokens
    fields = contract.spec(task.model_config, 2, n, t)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == \
        {k: (f.shape, np.dtype(f.dtype)) for k, f in fields.items()}
    assert task.batch_spec(2) == {k: (f.shape, f.dtype) for k, f in fields.items()}
    inputs, targets = contract.split(batch)   # every key is a contract field, no renaming
    assert set(contract.as_dict(inputs)) | set(contract.as_dict(targets)) == set(batch)
    np.testing.assert_array_equal(inputs.mask_hw[0, :2], [[29, 40], [40, 15]])   # longest side -> mask_size 40
    np.testing.assert_array_equal(inputs.original_hw[0, :2], [[30, 41], [52, 20]])
    with pytest.raises(KeyError, match="images_blip"):
        contract.split({**batch, "images_blip": batch["pixel_values"]})


def test_spec_axes_dims_and_programs():
    task = tiny_task(qformer_text_input=True)
    mcfg = task.model_config
    fields = contract.spec(mcfg, 4, 2, 64)
    assert fields["input_ids"].axes == ("batch", "length") and fields["qformer_input_ids"].shape == (4, 16)
    assert fields["pixel_values"] == ((4, 2, 28, 28, 3), fields["pixel_values"].dtype, ("batch",) + (None,) * 4)
    assert fields["masks"].shape == (4, mcfg.seg.max_seg, 40, 40) and all(f.axes[0] == "batch" for f in fields.values())
    emb = contract.spec(mcfg, 4, 2, 64, sam_embeddings=True)
    assert "sam_pixel_values" not in emb and emb["sam_image_embeddings"].shape == (4, 2, 4, 4, 16)
    predict = contract.spec(mcfg, 1, 2, 128, program="predict")
    assert set(predict) == {"input_ids", "attention_mask", "pixel_values", "dino_pixel_values", "sam_pixel_values",
                            "resized_hw", "original_hw", "qformer_input_ids", "qformer_attention_mask"}
    no_dino = contract.spec(mcfg.replace(preprocess=mcfg.preprocess.replace(dinov2_size=0, dinov2_crop=0),
                                         cem=mcfg.cem.replace(enabled=False)), 1, 2, 8)
    assert "dino_pixel_values" not in no_dino
    with pytest.raises(ValueError, match="program"):
        contract.spec(mcfg, 1, 2, 8, program="eval")


class Recording:
    """A CalicoInputs view that records which fields are read."""

    def __init__(self, inputs, read: set):
        self._inputs, self._read = inputs, read

    def __getattr__(self, name):
        self._read.add(name)
        return getattr(self._inputs, name)


@pytest.mark.parametrize("text", [False, True], ids=["queries_only", "qformer_text"])
def test_spec_covers_every_field_the_model_reads(text):
    task = tiny_task(qformer_text_input=text)
    fields = contract.spec(task.model_config, 2, task.cfg.data.max_images, task.cfg.data.max_tokens)
    inputs, targets = contract.split(contract.abstract(fields))
    params = nn.unbox(pretrained.abstract_params(task.module))
    read: set = set()
    out = jax.eval_shape(lambda p, x, y: task.module.apply({"params": p}, Recording(x, read), labels=y),
                         params, inputs, targets.labels)
    assert out["mask_logits"].shape == (2, task.model_config.seg.max_seg, 40, 40)
    given = set(contract.as_dict(inputs))
    assert read <= set(contract.names(contract.CalicoInputs))
    # read but not in the training spec: only the optional alternatives spec offers as switches
    assert read - given == {"prompt_lengths", "sam_image_embeddings"}
    assert "prompt_lengths" in contract.spec(task.model_config, 2, 2, 8, prompt_lengths=True)
    # in the spec but not read: only the host-side original size
    assert given - read == {"original_hw"}
    assert ({"qformer_input_ids", "qformer_attention_mask"} <= read) == text
