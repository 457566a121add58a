"""bench/nscale.py without compiling the model (the bench run does that): N-image prompts and their prefill
lengths, the demo part's absence note, the table."""
from bench import nscale
from calico_jax.core.tokens import IMAGE_TOKEN_INDEX


def test_prompts_and_prefill_tokens_grow_with_n(tmp_path):
    d = nscale.tiny_prompts((2, 4), per_task=1, work=tmp_path)
    q = d["config"].num_image_tokens
    for n in (2, 4):
        assert d["sets"][n]["samples"] and all(len(s["images"]) == n for s in d["sets"][n]["samples"])
        for p, spliced in zip(d["prompts"][n], d["spliced"][n], strict=True):
            assert p.count(IMAGE_TOKEN_INDEX) == n and spliced == len(p) + n * (q - 1)
    # two more images: their image tokens, plus the longer "The <image> (IMAGE1), ..." prefix
    assert min(d["spliced"][4]) > max(d["spliced"][2]) - 8 + 2 * q


def test_demo_metrics_without_a_model_and_table(tmp_path):
    rows, note = nscale.demo_metrics((2,), demo=tmp_path / "nope")
    assert rows == [] and "no demo model" in note
    cost = [{"N": n, "prefill_tokens": 10.0 * n, "forward_gflop": 0.01 * n, "latency_ms": 2.0,
             "latency_range_ms": [1.0, 3.0]} for n in (2, 3)]
    demo = [{"N": 2, "samples": 3, "AP50": 50.0, "mIoU": 40.0, "Recall": 30.0, "SS": 90.0, "S-IoU": 80.0}]
    lines = nscale.markdown(cost, demo, note).splitlines()
    assert lines[2] == "| 2 | 20.0 | 0.020 | 1.0 / 2.0 | 3 | 50.0 | 40.0 | 30.0 | 90.0 | 80.0 |"
    assert lines[3] == "| 3 | 30.0 | 0.030 | 1.0 / 2.0 | — | — | — | — | — | — |"
    assert lines[-1] == note
