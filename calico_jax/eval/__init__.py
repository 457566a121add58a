"""Evaluation: CALICO's metrics (AP50, mIoU, Recall, SS, S-IoU: :mod:`~calico_jax.eval.metrics`), mask matching
(:mod:`~calico_jax.eval.masks`), label cleaning (:mod:`~calico_jax.eval.labels`), the sentence encoder for SS
(:mod:`~calico_jax.eval.sentence`, the only part that needs JAX) and reports (:mod:`~calico_jax.eval.report`).

Nothing is loaded at import; ``SentenceEncoder()`` reads the all-MiniLM-L6-v2 weights when built."""
