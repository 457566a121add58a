"""CPU smoke run: the tiny CALICO (CalicoConfig.tiny: 2-layer EVA/Q-Former/DINOv2, 4-layer LLaMA + LoRA,
CAMs at {1, 3}, SAM at 32 px) on a synthetic part dataset built under WORKDIR/data. Paper recipe for
everything else (AdamW 0.9/0.95, warm-up + cosine, clip 1.0, the paper's trainable set)."""
from calico_jax.models.calico import CalicoConfig
from calico_jax.train.config import DataConfig, SyntheticConfig
from configs import common


def get_config():
    return common.experiment(
        "tiny", CalicoConfig.tiny(),
        data=DataConfig(synthetic=SyntheticConfig(num_images=24), max_images=2, max_tokens=192),
        optim=common.paper_optim(learning_rate=1e-3, warmup_steps=5, decay="cosine"),
        total_steps=30, checkpoint_every=10, log_every=1, eval_every=0, batch_size=8)
