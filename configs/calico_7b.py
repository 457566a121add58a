"""The paper recipe: CALICO-7B (InstructBLIP-Vicuna-7B vision + Q-Former, DINOv2 ViT-g/14, Vicuna-7B with
LoRA r=8 α=16, SAM ViT-H, CAMs at {11, 22}), trainable = LoRA + CEM + CAMs + SAM mask decoder
(CalicoConfig.trainable). Frozen towers and the LLM compute in bf16, trainable masters stay fp32.

Sources (paper-notes §5): lr 4e-4 and 10 "epochs" are [PN] (unverified; GLaMM's epoch = 500 steps);
β (0.9, 0.95), wd 0, linear warm-up 100 steps then linear decay to 0, clip 1.0, 2 samples per GPU x 8
GPUs x grad-accum 10 are GLaMM's defaults. Set model.base_checkpoint to the converted GLaMM/CALICO
base (python -m convert ...) and data.pairs / data.tokenizer to the real data; without them the run
uses random weights and the synthetic set (smoke test only).

AOT plan: python train.py --config configs/calico_7b.py --compile_only --devices 8
          python train.py --config configs/calico_7b.py --compile_only --devices 1 --config.batch_size=2 --config.optim.grad_accum=1
"""
from calico_jax.train.config import CheckpointConfig, DataConfig, ExperimentConfig, ModelConfig, OptimConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="calico_7b",
        model=ModelConfig(task="calico", size="7b", dtype="bfloat16", frozen_dtype="bfloat16", base_checkpoint=""),
        data=DataConfig(max_images=2, max_segs=8, max_tokens=512, blip_size=224, dinov2_size=224, sam_size=1024,
                        mask_size=1024, hflip=0.0, color_jitter=0.0, worker_count=2),
        optim=OptimConfig(learning_rate=4e-4, warmup_steps=100, decay="linear", end_lr_ratio=0.0, b1=0.9, b2=0.95,
                          weight_decay=0.0, clip_norm=1.0, grad_accum=10),
        checkpoint=CheckpointConfig(max_to_keep=3, async_save=True),
        total_steps=5000, checkpoint_every=500, log_every=10, eval_every=500, seed=0, batch_size=160,
        mesh={"data": 1, "fsdp": -1, "tensor": 1})
