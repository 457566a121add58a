"""CPU demo: the tiny CALICO (CalicoConfig.tiny: 2-layer EVA/Q-Former/DINOv2, 4-layer LLaMA + LoRA,
CAMs at {1, 3}, SAM at 32 px) on a synthetic part dataset built under WORKDIR/data. Paper recipe
for everything else (AdamW 0.9/0.95, warmup + cosine, clip 1.0, paper trainable set)."""
from calico_jax.train.config import CheckpointConfig, DataConfig, ExperimentConfig, ModelConfig, OptimConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="tiny",
        model=ModelConfig(task="calico", size="tiny", dtype="float32"),
        data=DataConfig(synthetic_images=24, max_images=2, max_segs=4, max_tokens=192, blip_size=28,
                        dinov2_size=42, sam_size=32, mask_size=40),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=5, decay="cosine", weight_decay=0.0),
        checkpoint=CheckpointConfig(max_to_keep=3),
        total_steps=30, checkpoint_every=10, log_every=1, eval_every=0, seed=0, batch_size=8,
        mesh={"data": -1, "fsdp": 1, "tensor": 1})
