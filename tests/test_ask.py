"""Answers in a person's terms (calico_jax/inference/ask.py): the sentence without grounding tokens, one line per
mask, and the warnings a sentence does not say."""
import types

import numpy as np

from calico_jax.inference.ask import readable, to_answer


def test_answer_warnings_name_missing_and_empty_masks():
    masks = [types.SimpleNamespace(label="handle", image=0, mask=np.ones((2, 2), bool), score=0.9),
             types.SimpleNamespace(label="spout", image=1, mask=np.zeros((2, 2), bool), score=0.0)]
    pred = types.SimpleNamespace(answer="The <p> handle </p> [SEG] (IMAGE1) and <p> spout </p> [SEG] (IMAGE2) .",
                                 masks=masks, num_unrouted=0, truncated=False)
    a = to_answer(pred, 3, trained_max_images=2)
    assert a.sentence == readable(pred.answer) == "The handle and spout."
    assert a.warnings == ["no mask for image 3", "1 of the 2 masks is empty (the model found nothing above its "
                          "threshold)", "3 images, but this model was trained on samples of at most 2: expect "
                          "worse answers"]
    assert "handle" in a.mask_lines()[0] and "image 1" in a.mask_lines()[0] and "4 px" in a.mask_lines()[0]
