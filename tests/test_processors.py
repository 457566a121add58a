"""Processors vs transformers (PIL backends: what transformers runs without torchvision), mask geometry,
and image-mode / EXIF handling."""
import io

import numpy as np
import pytest
from PIL import Image

from calico_jax.data.processors import BlipProcessor, Dinov2Processor, SamProcessor, load_image, to_rgb

tf_blip = pytest.importorskip("transformers.models.blip.image_processing_pil_blip")
tf_bit = pytest.importorskip("transformers.models.bit.image_processing_pil_bit")
tf_sam = pytest.importorskip("transformers.models.sam.image_processing_pil_sam")
from transformers.image_transforms import convert_to_rgb  # noqa: E402
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

SIZES = [(300, 457), (640, 480), (97, 1200), (224, 224), (1100, 800)]


def rand_image(h, w, seed=0):
    # smooth + noise content so bicubic ringing and rounding both show up
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 7.0), np.cos(yy / 5.0), np.sin((xx + yy) / 11.0)], -1) * 100 + 128
    return Image.fromarray(np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))


def hwc(x):
    return np.asarray(x)[0].transpose(1, 2, 0)


@pytest.mark.parametrize("h,w", SIZES)
def test_blip_matches_transformers(h, w):
    im = rand_image(h, w)
    ref = hwc(tf_blip.BlipImageProcessorPil(size={"height": 224, "width": 224})(im, return_tensors="np")
              ["pixel_values"])
    out = BlipProcessor()(im)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    assert np.abs(out - ref).max() <= 1e-6


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("size,crop", [(256, 224), (448, 448)])
def test_dinov2_matches_transformers(h, w, size, crop):
    im = rand_image(h, w, seed=1)
    ref_proc = tf_bit.BitImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop},
                                           image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
    ref = hwc(ref_proc(im, return_tensors="np")["pixel_values"])
    out = Dinov2Processor(size=size, crop=crop)(im)
    assert out.shape == (crop, crop, 3)
    assert np.abs(out - ref).max() <= 1e-6


@pytest.mark.parametrize("h,w", SIZES)
def test_sam_matches_transformers_including_resize_info_and_mask_labels(h, w):
    im = rand_image(h, w, seed=2)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 5: h // 2, w // 3: (3 * w) // 4] = 1
    ref = tf_sam.SamImageProcessorPil()(im, segmentation_maps=mask, return_tensors="np")
    out = SamProcessor()(im)
    assert np.abs(out["pixel_values"] - hwc(ref["pixel_values"])).max() <= 1e-6
    assert tuple(out["original_size"]) == tuple(ref["original_sizes"][0]) == (h, w)
    assert tuple(out["reshaped_input_size"]) == tuple(ref["reshaped_input_sizes"][0])
    rh, rw = out["reshaped_input_size"]
    assert np.all(out["pixel_values"][rh:] == 0) and np.all(out["pixel_values"][:, rw:] == 0)
    low = SamProcessor().masks(mask[None].astype(bool), low_res=True)[0]
    assert np.array_equal(low, ref["labels"][0].astype(bool))


def colored_square(h, w):
    a = np.zeros((h, w, 3), np.uint8)
    a[:, :] = (20, 20, 20)
    m = np.zeros((h, w), bool)
    m[h // 4: (3 * h) // 4, w // 5: w // 2] = True
    a[m] = (250, 30, 30)
    return Image.fromarray(a), m


@pytest.mark.parametrize("proc", [BlipProcessor(), Dinov2Processor(), Dinov2Processor(size=224, crop=None),
                                  Dinov2Processor(size=224, crop=None, square=True)])
def test_masks_follow_image_geometry(proc):
    im, m = colored_square(150, 310)
    x = proc(im)
    red = x[..., 0] > x[..., 1] + 1.0                         # where the processed image is red
    pm = proc.masks(m[None])[0]
    assert pm.shape == x.shape[:2]
    iou = (red & pm).sum() / (red | pm).sum()
    assert iou > 0.95, iou


def test_sam_masks_follow_image_geometry_and_postprocess_info():
    im, m = colored_square(150, 310)
    proc = SamProcessor()
    out = proc(im)
    x = out["pixel_values"]
    red = x[..., 0] > x[..., 1] + 1.0
    pm = proc.masks(m[None])[0]
    assert pm.shape == (1024, 1024) and (red & pm).sum() / (red | pm).sum() > 0.98
    (h, w), orig = proc.postprocess_size(out)
    assert (h, w) == (int(150 * 1024 / 310 + 0.5), 1024) == (495, 1024) and orig == (150, 310)


def test_exif_orientation_and_annotation_size_rule(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = 255                                           # white stripe on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6                                          # rotate 90 degrees clockwise for display
    path = tmp_path / "rot.jpg"
    Image.fromarray(a).save(path, exif=exif.tobytes(), quality=95)
    shown = load_image(path)
    assert shown.shape == (40, 20, 3) and shown[:10].mean() > 200 and shown[-10:].mean() < 50   # stripe on top
    raw = load_image(path, expected_hw=(20, 40))              # annotation drawn on the stored pixels
    assert raw.shape == (20, 40, 3) and raw[:, :10].mean() > 200
    assert load_image(path, expected_hw=(40, 20)).shape == (40, 20, 3)


@pytest.mark.parametrize("mode", ["L", "P", "P_transparent", "RGBA", "LA", "CMYK", "I;16"])
def test_modes_become_rgb_like_transformers(mode, tmp_path):
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    if mode == "P_transparent":
        im = rgb.convert("P")
        im.info["transparency"] = 5
    elif mode == "RGBA":
        im = Image.fromarray(rng.integers(0, 256, (12, 16, 4), dtype=np.uint8), "RGBA")
    elif mode == "I;16":
        im = Image.fromarray(rng.integers(0, 256, (12, 16), dtype=np.uint16))
    else:
        im = rgb.convert(mode)
    out = np.asarray(to_rgb(im))
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    if mode != "I;16":
        assert np.array_equal(out, convert_to_rgb(im, return_numpy=True))
    if mode == "RGBA":   # transparent pixels go to white, opaque keep their colour
        arr = np.asarray(im)
        assert np.array_equal(out[arr[..., 3] == 255], arr[arr[..., 3] == 255][:, :3])
    buf = io.BytesIO()
    (im if mode not in ("CMYK", "I;16", "P_transparent") else to_rgb(im)).save(buf, format="PNG")
    assert load_image(Image.open(io.BytesIO(buf.getvalue()))).shape == (12, 16, 3)


def test_rejects_non_rgb_arrays():
    with pytest.raises(ValueError, match="RGB uint8"):
        BlipProcessor()(np.zeros((10, 10), np.float32))
