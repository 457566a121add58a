"""grain input pipeline: a pairs file -> padded, static-shape training batches for the CALICO model.

Stages (grain 0.2 dataset API)::

    MapDataset.source(kept records)            a pairs file in memory: tokenized up front (SampleTokenizer),
                                               drops counted
    | MapDataset.range(samples)                a packed directory (calico_jax.data.packed): sample indices only
      .seed(seed).shuffle()                    seeded; reshuffled every epoch (grain reseeds per epoch)
      .repeat(num_epochs)
      .map(LoadDecode)                         packed: read, check and tokenize the record, read its image
                                               entries and masks (calico_jax.data.records; a bad one -> skip),
                                               then Decode
    | .map(Decode)                             image files -> RGB uint8, [SEG] masks -> bool (original size)
      .random_map(Augment)                     seeded per element: h-flip (image and its masks together),
                                               colour jitter (image only)
      .map(Process)                            BLIP / DINOv2 / SAM processors, mask transform, padding
      BlockShard(process_index, process_count) per-process shard: block i of every batch (see below)
      .to_iter_dataset(ReadOptions)
      CountSkips                               drops skipped records (an image that failed to load, a bad
                                               packed record), counting them by kind into the next element
      .batch(batch_size)                       stacks: every element already has the static shapes
      .mp_prefetch(workers)                    optional (worker_count > 0)
      .map(ReportSkips)                        main process: the counts into ``Pipeline.report``

The graph pickles small either way for a packed directory (its paths, the tokenizer): a worker reads the records
it needs; the maps are lazy, so the per-process shard, applied last, reads only that process's block of
the shuffled global order -- the same for every worker count.

Sharding over processes: element ``k`` of process ``i``'s stream is element
``(k // b) * n * b + i * b + k % b`` of the global one (``n`` processes, ``b`` = ``shard_block`` rows: a
micro-batch's rows per process), so process ``i`` reads rows ``[i*b, (i+1)*b)`` of every global micro-batch -- the
rows its devices hold -- and the global batches are those of one process reading everything, in order.

Batch: a flat dict of numpy arrays whose keys, shapes and dtypes are the CALICO batch contract's
(:mod:`calico_jax.models.inputs`, ``spec(model_config, B, N, T)`` with B = batch_size per process, N = max_images,
T = max_tokens and M = max_segs [SEG] slots): inputs, targets and the bookkeeping ``task`` / ``sample_index``.
What this pipeline puts there: ``input_ids`` is the llava_v1 conversation (one IMAGE_TOKEN_INDEX slot per valid
image, wrapped in <im_start>/<im_end>), right-padded with the tokenizer's pad id; padding images are 0 in every
pixel field and size; ``masks`` are the pairs file's RLEs transformed as SAM's input (longest side to
``mask_size``, PIL nearest, padded with False); ``seg_image`` is 0 on padding.

The s-th ``[SEG]`` token of ``input_ids[b]`` (in order) goes with ``masks[b, s]``; the number of
``[SEG]`` ids in a row always equals ``mask_valid[b].sum()``.

Drops (counted in ``Pipeline.report``, named by sample id): ``too_long_prompt`` / ``too_long_seg``
(truncation would separate an image slot or a [SEG] from its identifier or mask, see
:class:`~calico_jax.data.tokenize.SampleTokenizer`), ``bad_seg_identifier``, ``too_many_images``,
``too_many_segs``. An image that fails to load at read time (missing, corrupt, size not the
annotation's) is logged by name and the sample skipped -- never a crash mid-epoch. With a packed directory every
drop happens at read time (the same kinds, plus ``bad_record`` / ``bad_sample`` for a record that is not a valid
sample) and ``strict=True`` raises :class:`DataError` at the first instead.

Checkpointing: ``it = iter(pipeline.dataset()); state = it.get_state(); it2.set_state(state)``
yields exactly the batch ``it`` would yield next, with or without workers (orbax:
``grain.checkpoint.CheckpointSave(it)``). Workers are spawned processes: the entry script needs an
``if __name__ == "__main__":`` guard (a piped ``python -`` script does not work); absl flags are
marked parsed here so a script without ``absl.app.run`` works.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass

import grain
import numpy as np

from calico_jax.core.preprocess import Preprocess
from calico_jax.core.tokens import IGNORE_INDEX
from calico_jax.data.packed import PackedPairs
from calico_jax.data.pairs_io import Pairs, read_pairs
from calico_jax.data.pairs_schema import TASKS
from calico_jax.data.processors import SamProcessor, from_preprocess, load_image
from calico_jax.data.records import CountSkips, LoadPacked, ReportSkips, skip_marker, tokenize_sample
from calico_jax.data.rle import decode
from calico_jax.data.skips import DataError, Report
from calico_jax.data.tokenize import SampleTokenizer, build_tiny_tokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    """Static shapes, processor sizes, augmentation and loader options (defaults: the 7B model)."""
    batch_size: int = 2                  # per process
    max_images: int = 2                  # N
    max_segs: int = 16                   # S
    max_tokens: int = 512                # T
    preprocess: Preprocess = Preprocess()   # image sizes and normalisation: the model's (CalicoConfig.preprocess)
    use_im_start_end: bool = True
    hflip: float = 0.5                   # probability; part names are not left/right-swapped
    color_jitter: float = 0.2            # brightness and contrast factors in [1 - j, 1 + j]; 0: off
    shuffle: bool = True
    num_epochs: int | None = 1           # None: repeat forever
    drop_remainder: bool = True
    seed: int = 0
    num_threads: int = 4                 # reader threads per process (or per worker)
    prefetch_buffer_size: int = 8
    worker_count: int = 0                # > 0: grain mp_prefetch processes
    worker_buffer_size: int = 2
    shard_block: int = 0                 # rows per process of one global micro-batch; 0 = batch_size


# -------------------------------------------------------------------------------------- records
def tokenize_records(pairs: Pairs, tokenizer, cfg: PipelineConfig, report: Report) -> list[dict]:
    """Tokenizes every sample of a pairs file in memory once; returns the kept ones as small picklable records."""
    st = SampleTokenizer(tokenizer, cfg.max_tokens, cfg.use_im_start_end)
    out = []
    for i, s in enumerate(pairs.samples):
        rec, kind, detail = tokenize_sample(s, i, st, cfg.max_images, cfg.max_segs)
        if rec is None:
            report.skip(kind, f"sample {s.get('id', i)}", detail)
        else:
            out.append(rec)
    return out


# ----------------------------------------------------------------------------------- transforms
class Decode(grain.transforms.Map):
    """record -> images (uint8 [H, W, 3], original size) and masks (bool [H, W] per [SEG])."""

    def __init__(self, pairs: Pairs):
        self.pairs = pairs

    def map(self, rec: dict) -> dict:
        if "skip" in rec:
            return rec
        if "sample" in rec:   # read with its tables by LoadPacked
            s, paths, hws, rles = rec.pop("sample"), rec.pop("paths"), rec.pop("hw"), rec.pop("rles")
        else:
            s = self.pairs.samples[rec["index"]]
            paths = [self.pairs.image_path(s, k) for k in range(len(s["images"]))]
            hws = [(self.pairs.images[i]["height"], self.pairs.images[i]["width"]) for i in s["images"]]
            rles = [self.pairs.masks[g["mask"]]["rle"] for g in s["segs"]]
        try:
            images = []
            for path, hw in zip(paths, hws):
                im = load_image(path, tuple(hw))
                if im.shape[:2] != tuple(hw):
                    raise ValueError(f"image {im.shape[:2]} != annotation {tuple(hw)}")
                images.append(im)
        except Exception as e:  # noqa: BLE001 -- PIL raises many types; a bad file must not stop the epoch
            log.warning("skipping sample %s: image %s: %s: %s", s.get("id"), path, type(e).__name__, e)
            return skip_marker("image_unreadable", f"sample {s.get('id')}", f"{path}: {type(e).__name__}: {e}")
        masks = [decode(r) for r in rles]
        return {**rec, "task": TASKS.index(s["task"]), "images": images, "masks": masks,
                "seg_image": [g["image"] for g in s["segs"]]}


class LoadDecode(grain.transforms.Map):
    """A packed directory's sample index -> :class:`Decode`'s output (or a skip marker)."""

    def __init__(self, load: LoadPacked, decode: Decode):
        self.load, self.decode = load, decode

    def map(self, i) -> dict:
        return self.decode.map(self.load.map(i))


class Augment(grain.transforms.RandomMap):
    """Seeded per element: horizontal flip of an image and of every mask of that image; brightness
    and contrast jitter of the image (masks untouched)."""

    def __init__(self, hflip: float, color_jitter: float):
        self.hflip, self.jitter = hflip, color_jitter

    def random_map(self, ex: dict, rng: np.random.Generator) -> dict:
        if "skip" in ex:
            return ex
        images, masks = list(ex["images"]), list(ex["masks"])
        for k in range(len(images)):
            flip = rng.random() < self.hflip
            b, c = rng.uniform(1 - self.jitter, 1 + self.jitter, size=2)
            x = images[k][:, ::-1] if flip else images[k]
            if self.jitter:
                x = x.astype(np.float32)
                x = np.clip((x - x.mean()) * c + x.mean() * b, 0, 255).round().astype(np.uint8)
            images[k] = np.ascontiguousarray(x)
            if flip:
                masks = [np.ascontiguousarray(m[:, ::-1]) if ex["seg_image"][j] == k else m
                         for j, m in enumerate(masks)]
        return {**ex, "images": images, "masks": masks}


class Process(grain.transforms.Map):
    """Processors per tower, mask transform, padding to the static shapes of the batch dict."""

    def __init__(self, cfg: PipelineConfig, pad_id: int):
        self.cfg, self.pad_id, pre = cfg, int(pad_id), cfg.preprocess
        if pre.dinov2_size and not pre.dinov2_crop:
            raise ValueError("DINOv2 input needs a static shape: set preprocess.dinov2_crop")
        self.blip, self.dino, self.sam = from_preprocess(pre)
        self.mask_proc = SamProcessor(pre.mask_size)

    def map(self, ex: dict) -> dict:
        if "skip" in ex:
            return ex
        cfg, n, s, t = self.cfg.preprocess, self.cfg.max_images, self.cfg.max_segs, self.cfg.max_tokens
        out = {"input_ids": np.full(t, self.pad_id, np.int32), "labels": np.full(t, IGNORE_INDEX, np.int32),
               "attention_mask": np.zeros(t, np.int32)}
        L = len(ex["input_ids"])
        out["input_ids"][:L], out["labels"][:L], out["attention_mask"][:L] = ex["input_ids"], ex["labels"], 1
        out["pixel_values"] = np.zeros((n, cfg.blip_size, cfg.blip_size, 3), np.float32)
        out["sam_pixel_values"] = np.zeros((n, cfg.sam_size, cfg.sam_size, 3), np.float32)
        out["image_valid"] = np.zeros(n, bool)
        out["original_hw"], out["resized_hw"], out["mask_hw"] = (np.zeros((n, 2), np.int32) for _ in range(3))
        dino = []
        for k, im in enumerate(ex["images"]):
            out["pixel_values"][k] = self.blip(im)
            sam = self.sam(im)
            out["sam_pixel_values"][k] = sam["pixel_values"]
            out["resized_hw"][k] = sam["reshaped_input_size"]
            out["original_hw"][k] = im.shape[:2]
            out["mask_hw"][k] = SamProcessor.resized_hw(*im.shape[:2], cfg.mask_size)
            out["image_valid"][k] = True
            if self.dino is not None:
                dino.append(self.dino(im))
        if self.dino is not None:
            out["dino_pixel_values"] = np.zeros((n, *dino[0].shape), np.float32)
            out["dino_pixel_values"][:len(dino)] = dino
        m = cfg.mask_size
        out["masks"] = np.zeros((s, m, m), bool)
        for j, mask in enumerate(ex["masks"]):
            out["masks"][j] = self.mask_proc.masks(mask[None])[0]
        out["mask_valid"] = np.arange(s) < len(ex["masks"])
        out["seg_image"] = np.zeros(s, np.int32)
        out["seg_image"][:len(ex["seg_image"])] = ex["seg_image"]
        out["task"] = np.int32(ex["task"])
        out["sample_index"] = np.int32(ex["index"])
        return out


# ------------------------------------------------------------------------------------- pipeline
class BlockShard(grain.MapDataset):
    """Block ``index`` of ``count`` of every ``count * block`` consecutive elements of ``parent`` (a process's
    contiguous rows of each global micro-batch; ``[index::count]`` would interleave them)."""

    def __init__(self, parent: grain.MapDataset, index: int, count: int, block: int):
        super().__init__(parent)
        if not 0 <= index < count or block < 1:
            raise ValueError(f"BlockShard: block {index} of {count} with {block} rows is not a shard")
        self._index, self._count, self._block = index, count, block
        self._length = len(parent) // (count * block) * block

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        group, row = divmod(i, self._block)
        return self._parent[(group * self._count + self._index) * self._block + row]

    def __str__(self) -> str:
        return f"BlockShard(block {self._index} of {self._count}, {self._block} rows)"


def shard(ds: grain.MapDataset, index: int, count: int, block: int) -> grain.MapDataset:
    return ds if count == 1 else BlockShard(ds, index, count, block)


class Pipeline:
    """Builds the grain dataset for one process. ``report`` holds the samples dropped up front (a pairs file in
    memory) and those skipped at read time, added as their batches arrive (:mod:`calico_jax.data.records`).
    ``pairs``: a :class:`Pairs` (tokenized up front) or a :class:`PackedPairs` (read, checked, tokenized and
    decoded in the grain map: the graph holds paths, each process reads only its block's records)."""

    def __init__(self, pairs: Pairs | PackedPairs, tokenizer, cfg: PipelineConfig = PipelineConfig(),
                 process_index: int | None = None, process_count: int | None = None, strict: bool = False):
        if process_index is None or process_count is None:
            import jax
            process_index, process_count = jax.process_index(), jax.process_count()
        self.pairs, self.cfg = pairs, cfg
        self.process_index, self.process_count = process_index, process_count
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        self.report, self.strict, self.tokenizer = Report(strict), strict, tokenizer
        self.lazy = isinstance(pairs, PackedPairs)
        self.records = None if self.lazy else tokenize_records(pairs, tokenizer, cfg, self.report)

    def map_dataset(self) -> grain.MapDataset:
        """Per-element (unbatched) padded examples of this process, in epoch order."""
        cfg = self.cfg
        src = grain.MapDataset.range(len(self.pairs)) if self.lazy else grain.MapDataset.source(self.records)
        ds = src.seed(cfg.seed)
        if cfg.shuffle:
            ds = ds.shuffle()
        if cfg.num_epochs != 1:
            ds = ds.repeat(cfg.num_epochs)
        if self.lazy:   # one map, so that Augment sits at the same depth of the graph (grain derives its seed so)
            ds = ds.map(LoadDecode(LoadPacked(self.pairs, self.tokenizer, cfg.max_tokens, cfg.use_im_start_end,
                                              cfg.max_images, cfg.max_segs, self.strict), Decode(self.pairs)))
        else:
            ds = ds.map(Decode(self.pairs))
        if cfg.hflip or cfg.color_jitter:
            ds = ds.random_map(Augment(cfg.hflip, cfg.color_jitter))
        ds = ds.map(Process(cfg, self.pad_id))
        return shard(ds, self.process_index, self.process_count, cfg.shard_block or cfg.batch_size)

    def dataset(self) -> grain.IterDataset:
        cfg = self.cfg
        ds = self.map_dataset().to_iter_dataset(
            grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size))
        ds = CountSkips(ds).batch(cfg.batch_size, drop_remainder=cfg.drop_remainder)
        if cfg.worker_count > 0:
            from absl import flags
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()   # grain workers read absl flags; fine outside absl.app.run
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                             per_worker_buffer_size=cfg.worker_buffer_size))
        return ds.map(ReportSkips(self.report))

    def __iter__(self):
        return iter(self.dataset())


def measure_throughput(iterable, num_batches: int = 20, warmup: int = 2) -> dict:
    """Samples/s of an iterable of batch dicts, timed after ``warmup`` batches (which absorb worker
    start-up). An iterator made here (from a :class:`Pipeline` or a dataset) is closed afterwards."""
    it = iter(iterable)
    owned = it is not iterable
    try:
        for _ in range(warmup):
            next(it)
        n, done, t0 = 0, 0, time.perf_counter()
        for _ in range(num_batches):
            try:
                n += len(next(it)["input_ids"])
            except StopIteration:
                break
            done += 1
        dt = time.perf_counter() - t0
    finally:
        if owned and hasattr(it, "close"):
            it.close()
    return {"samples_per_s": n / dt if dt > 0 else float("nan"), "batches": done, "samples": n, "seconds": dt}


# --------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calico_jax.data.pipeline",
                                 description="Loader throughput (samples/s) on a pairs file.")
    ap.add_argument("--pairs", required=True, help="pairs JSON file or packed directory (calico_jax.data.pack)")
    ap.add_argument("--strict", action="store_true", help="stop at the first bad record")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: a tiny local one)")
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--sam_size", type=int, default=1024)
    ap.add_argument("--dinov2_size", type=int, default=256)
    ap.add_argument("--max_tokens", type=int, default=512)
    ap.add_argument("--batches", type=int, default=20)
    a = ap.parse_args(argv)
    if a.tokenizer is None:
        a.tokenizer = tempfile.mkdtemp()
        build_tiny_tokenizer(a.tokenizer, vocab_size=400)
    pre = Preprocess(sam_size=a.sam_size, mask_size=a.sam_size, dinov2_size=a.dinov2_size,
                     dinov2_crop=224 if a.dinov2_size else 0)
    cfg = PipelineConfig(batch_size=a.batch_size, worker_count=a.workers, preprocess=pre, max_tokens=a.max_tokens,
                         num_epochs=None)
    try:
        pipe = Pipeline(read_pairs(a.pairs), load_tokenizer(a.tokenizer), cfg, 0, 1, strict=a.strict)
        r = measure_throughput(pipe, a.batches)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(pipe.report.summary())
    print(f"{r['samples_per_s']:.1f} samples/s ({r['samples']} samples in {r['seconds']:.2f}s, "
          f"batch {a.batch_size}, workers {a.workers}, sam {a.sam_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
