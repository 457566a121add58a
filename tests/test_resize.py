"""calico_jax.core.resize equals torch.nn.functional.interpolate (the reason it exists)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from calico_jax.core.resize import interp_matrix, resize_2d  # noqa: E402

SIZES = [(5, 4), (13, 20), (3, 17), (1, 2)]


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("size", SIZES)
def test_matches_torch_size(mode, antialias, size):
    x = np.random.default_rng(0).standard_normal((2, 7, 9, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode=mode,
                        align_corners=False, antialias=antialias).permute(0, 2, 3, 1).numpy()
    got = np.asarray(resize_2d(x, size, mode=mode, antialias=antialias))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-6)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_matches_torch_align_corners(mode):
    x = np.random.default_rng(1).standard_normal((1, 6, 5, 2)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(11, 3), mode=mode,
                        align_corners=True).permute(0, 2, 3, 1).numpy()
    got = np.asarray(resize_2d(x, (11, 3), mode=mode, align_corners=True))
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-6)


@pytest.mark.parametrize("scale", [(1.3, 0.77), (16.1 / 37, 16.1 / 37), (2.0, 3.0)])
def test_matches_torch_scale_factor(scale):
    """The original DINOv2 passes scale_factor, which changes the source-coordinate mapping."""
    x = np.random.default_rng(2).standard_normal((1, 7, 9, 4)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=scale, mode="bicubic",
                        align_corners=False).permute(0, 2, 3, 1).numpy()
    got = np.asarray(resize_2d(x, ref.shape[1:3], mode="bicubic", scale_factor=scale))
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-6)
    # Where 1/scale != in/out the size= mapping gives other values, so the test can tell them apart.
    if not np.isclose(x.shape[1] / ref.shape[1], 1 / scale[0]):
        plain = np.asarray(resize_2d(x, ref.shape[1:3], mode="bicubic"))
        assert np.max(np.abs(plain - ref)) > 1e-3


def test_bicubic_is_not_jax_image_resize():
    """Guards the reason for this module: jax's cubic kernel (a=-0.5) is not torch's (a=-0.75)."""
    import jax
    x = np.random.default_rng(3).standard_normal((1, 6, 6, 1)).astype(np.float32)
    ours = np.asarray(resize_2d(x, (13, 13), mode="bicubic"))
    theirs = np.asarray(jax.image.resize(x, (1, 13, 13, 1), "cubic"))
    assert np.max(np.abs(ours - theirs)) > 1e-2


def test_rows_sum_to_one_and_identity():
    for mode in ("bilinear", "bicubic"):
        for aa in (False, True):
            m = interp_matrix(7, 12, mode, antialias=aa)
            np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
            np.testing.assert_allclose(interp_matrix(9, 9, mode, antialias=aa), np.eye(9), atol=1e-12)
    with pytest.raises(ValueError, match="mode"):
        interp_matrix(3, 4, "nearest")
