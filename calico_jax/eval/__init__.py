"""Evaluation: CALICO's metrics (AP50, mIoU, Recall, SS, S-IoU), the sentence encoder for SS, reports.

Nothing is loaded at import; ``SentenceEncoder()`` reads the all-MiniLM-L6-v2 weights when built."""
from calico_jax.eval.labels import CLEANINGS, cleaners
from calico_jax.eval.masks import Mask, SampleResult, ap50, match
from calico_jax.eval.metrics import (
    METRICS,
    PROTOCOLS,
    MetricConfig,
    evaluate,
    miou,
    recall,
    semantic_iou,
    semantic_similarity,
    word_iou,
)
from calico_jax.eval.report import format_table, read_report, write_report
from calico_jax.eval.sentence import SentenceEncoder, SentenceModelError, normalize_label

__all__ = ["METRICS", "PROTOCOLS", "CLEANINGS", "cleaners",
           "Mask", "MetricConfig", "SampleResult", "ap50", "evaluate", "match", "miou", "recall",
           "semantic_iou", "semantic_similarity", "word_iou", "format_table", "read_report", "write_report",
           "SentenceEncoder", "SentenceModelError", "normalize_label"]
