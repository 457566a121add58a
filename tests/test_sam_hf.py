"""SAM parity against HF SamModel (save_pretrained -> hf-sam plan -> params), both TwoWay eps choices."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from calico_jax.checkpoints.torch_files import open_checkpoint  # noqa: E402
from calico_jax.models.sam import Sam, SamConfig  # noqa: E402
from convert.families.sam import HF_SAM, compare_hf  # noqa: E402
from convert.mapping import build_params  # noqa: E402
from tests.test_sam import check, hf_fixture  # noqa: E402


@pytest.mark.parametrize("decoder_eps", [1e-6, 1e-5])
def test_parity_hf(tmp_path, decoder_eps):
    """HF SamModel: TwoWay norms use mask_decoder_config.layer_norm_eps (a wrong eps gives ~7e-5 here)."""
    from transformers import SamModel

    model, directory = hf_fixture(tmp_path, decoder_eps)
    ckpt = open_checkpoint(directory)
    plan = HF_SAM.plan(ckpt, None)
    assert not plan.unexpected
    assert plan.config.mask_decoder.transformer.norm_eps == decoder_eps
    assert plan.config.prompt_encoder.mask_norm_eps == 1e-5
    assert SamConfig.from_hf_config(model.config) == plan.config  # config object == config.json dict
    params = build_params(ckpt, plan, progress=False)
    ref = SamModel.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    check(compare_hf(ref, Sam(plan.config), params), 9)
