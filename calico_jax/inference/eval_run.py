"""The model part of ``python -m calico_jax.evaluate``: predictions streamed to part files, resumable, over one or
several processes.

One process or N (``python -m calico_jax.launch --local N -- -m calico_jax.evaluate ...``, or ``--multihost``
with the ``JAX_COORDINATOR_ADDRESS``-style settings of :mod:`calico_jax.parallel.distributed`): the samples are
cut into batches by :func:`~calico_jax.inference.predictor.plan_batches` (grouped by image count, sample order),
process I predicts the I-th contiguous block of those batches on its own devices (``--mesh`` describes one
process) and appends them to its part file (:mod:`calico_jax.inference.stream`). After a barrier, process 0 reads
every part file and returns the predictions in sample order; the others return None. As every batch is the same
whatever the process count, the predictions (and so the report) equal a one-process run's.

The part files live in ``PRED.parts/`` next to ``--save_predictions PRED`` (else ``REPORT.parts/`` next to
``--out``); rerunning the same command resumes after the last complete batch, and the directory is removed once
the report is written.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from calico_jax.core.viz import figure
from calico_jax.data.processors import load_image
from calico_jax.data.rle import encode
from calico_jax.inference import stream
from calico_jax.inference.ask import readable
from calico_jax.parallel import distributed


def parts_dir(args) -> Path:
    target = Path(args.save_predictions or args.out)
    return target.with_name(target.name + ".parts")


class Run:
    """One evaluation's model run; ``joined``: this process passed the gathering barrier of a multi-process job."""

    def __init__(self, args):
        self.args, self.joined, self.index, self.processes = args, False, 0, 1

    def start(self) -> None:
        """Compile cache on; joins the job of several processes when the settings say so (before any jax use)."""
        from calico_jax.core.platform import enable_compile_cache
        spec = distributed.spec_from(self.args)
        enable_compile_cache()
        if spec is not None:
            distributed.initialize(spec)
        import jax
        self.index, self.processes = jax.process_index(), jax.process_count()

    def predict(self, pairs, samples: list[dict]) -> dict[str, dict] | None:
        """-> {id: record} in sample order on process 0, None on the others."""
        from calico_jax.inference.predictor import load_predictor, plan_batches  # after argparse: the models
        args = self.args
        overrides = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
        predictor = load_predictor(args.ckpt, mesh=args.mesh, dtype=args.dtype, **overrides)
        batches = plan_batches([len(s["images"]) for s in samples], args.batch_size)
        mine = stream.split_batches(batches, self.index, self.processes)
        ids = [s["id"] for s in samples]
        header = stream.fingerprint(
            ids, ckpt=str(Path(args.ckpt).absolute()), pairs=str(Path(args.pairs).absolute()),
            batch_size=args.batch_size, max_new_tokens=predictor.config.max_new_tokens, mesh=args.mesh,
            dtype=args.dtype, processes=self.processes)
        directory = parts_dir(args)
        part = stream.PartFile(stream.part_path(directory, self.index, self.processes), header,
                               {b: [ids[i] for i in batches[b]] for b in mine}).open()
        drawn = self._overlay_ids(samples)
        todo = part.pending()
        total = sum(len(batches[b]) for b in mine)
        bar = stream.Progress(total, total - sum(len(batches[b]) for b in todo), args.progress and self.index == 0)
        for b in todo:
            rows = [samples[i] for i in batches[b]]
            inputs = [(self._images(pairs, s), s["prompt"]) for s in rows]
            preds = predictor.predict_batch(inputs, args.batch_size)
            part.append(b, [record(s, p) for s, p in zip(rows, preds)])
            for s, (ims, _), p in zip(rows, inputs, preds):
                if s["id"] in drawn:
                    draw(Path(args.overlays), s, ims, p, pairs)
            bar.update(len(rows))
        timing = bar.close()
        if todo and args.progress and self.index == 0:
            rest = f", then {timing['samples_per_s']:.2f} samples/s" if timing["samples_per_s"] else ""
            print(f"predicted {sum(len(batches[b]) for b in todo)} samples: first batch (compile + run) "
                  f"{timing['first_batch_s']:.1f} s{rest}")
        distributed.barrier("evaluate_predictions")   # every part file is complete
        self.joined = True
        if self.index != 0:
            return None
        every = {b: [ids[i] for i in batch] for b, batch in enumerate(batches)}
        got = stream.gather(directory, self.processes, header, every)
        return {sid: got[sid] for sid in ids}

    def _overlay_ids(self, samples: list[dict]) -> set[str]:
        """The first ``--num_overlays`` samples of each task (global sample order, so any split draws the same)."""
        if not self.args.overlays:
            return set()
        out, per_task = set(), {}
        for s in samples:
            if per_task.get(s["task"], 0) < self.args.num_overlays:
                per_task[s["task"]] = per_task.get(s["task"], 0) + 1
                out.add(s["id"])
        return out

    @staticmethod
    def _images(pairs, sample: dict) -> list:
        ims = []
        for k, i in enumerate(sample["images"]):
            info = pairs.images[i]
            ims.append(load_image(pairs.image_path(sample, k), (info["height"], info["width"])))
        return ims

    def finish(self, ok: bool) -> None:
        """Process 0 removes the part files once the report is written; in a job every process that gathered waits
        here for process 0 (a process that left early would break the job's shutdown)."""
        if ok and self.index == 0:
            shutil.rmtree(parts_dir(self.args), ignore_errors=True)
        if self.joined and self.processes > 1:
            distributed.barrier("evaluate_done")


def record(sample: dict, p) -> dict:
    return {"id": sample["id"], "task": sample["task"], "answer": p.answer, "truncated": p.truncated,
            "num_unrouted_seg": p.num_unrouted,
            "masks": [{"label": m.label, "image": m.image, "score": round(m.score, 6), "rle": encode(m.mask)}
                      for m in p.masks]}


def draw(root: Path, sample: dict, images, pred, pairs) -> None:
    """The prediction above the ground truth, each as its images side by side with a legend and its answer
    sentence (objects and parts styled apart): ``{id}.png``, and the texts in ``{id}.txt``."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    kind = "object" if sample["task"] == "common_object" else "part"
    titles = [f"IMAGE{k + 1}" for k in range(len(images))]
    p = figure([(im, [(m.mask, m.label, kind) for m in pred.masks if m.image == k], f"prediction, {titles[k]}")
                for k, im in enumerate(images)], caption="predicted: " + readable(pred.answer))
    g = figure([(im, [(pairs.mask(s), s["label"], s.get("kind")) for s in sample["segs"] if s["image"] == k],
                 f"ground truth, {titles[k]}") for k, im in enumerate(images)],
               caption="ground truth: " + readable(sample["answer"]))
    both = Image.new("RGB", (max(p.width, g.width), p.height + g.height + 12), "white")
    both.paste(p, (0, 0))
    both.paste(g, (0, p.height + 12))
    both.save(root / f"{sample['id']}.png")
    (root / f"{sample['id']}.txt").write_text(f"prompt: {sample['prompt']}\npredicted: {pred.answer}\n"
                                              f"ground truth: {sample['answer']}\n", encoding="utf-8")
