"""The paper recipe: CALICO-7B (InstructBLIP-Vicuna-7B vision + Q-Former, DINOv2 ViT-B/14 with 4 registers as the
first author's code names it -- ``--config.model.dinov2='{}'`` selects ViT-g/14 --, Vicuna-7B with LoRA r=8 α=16,
SAM ViT-H, CAMs at {11, 22}; the Q-Former reads no instruction text unless ``--config.model.qformer_text_input=true``),
trainable = LoRA + CEM + CAMs + SAM mask decoder (recipe.trainable). Frozen towers and the LLM compute in bf16,
trainable masters stay fp32. Dry run: 8.66 B params, 27.0 M trainable (0.312 %), forward 14.9 TFLOPs.

Sources (docs/paper_map.md): lr 4e-4 and 10 "epochs" come from a secondary summary of the paper we could not
verify (GLaMM and the first author's LISA code use 3e-4; GLaMM's epoch = 500 steps); β (0.9,
0.95), wd 0, linear warm-up 100 steps then linear decay to 0, clip 1.0, 2 samples per GPU x 8 GPUs x grad-accum
10 are GLaMM's defaults. Set base_checkpoint to the converted GLaMM/CALICO base (python -m convert ...) and
data.pairs / data.tokenizer to the real data; without them the run uses random weights and the synthetic set
(smoke test only).

AOT plan: python train.py --config configs/calico_7b.py --compile_only --devices 8
          python train.py --config configs/calico_7b.py --compile_only --devices 1 --config.batch_size=2 \\
              --config.optim.grad_accum=1
"""
from calico_jax.models.calico import CalicoConfig
from calico_jax.train.config import DataConfig
from configs import common


def get_config():
    # 224 px BLIP / DINOv2, SAM 1024, 8 [SEG] slots (CalicoConfig defaults). Layer scan (models/scan.py) is off:
    # on v5p:2x2x1 it compiled faster (532 vs 870 s, different host loads) but planned 45.2 instead of 24.0 GB per
    # device (bench/results/scan_compile.md); --config.model.llm.scan_layers=true etc. turn it on per tower.
    model = CalicoConfig()
    return common.experiment(
        "calico_7b", model, dtype="bfloat16", frozen_dtype="bfloat16", base_checkpoint="",
        data=DataConfig(max_images=2, max_tokens=512, hflip=0.0, color_jitter=0.0, worker_count=2),
        optim=common.paper_optim(learning_rate=4e-4, warmup_steps=100, decay="linear", end_lr_ratio=0.0,
                                 grad_accum=10),
        total_steps=5000, checkpoint_every=500, log_every=10, eval_every=500, batch_size=160,
        mesh={"data": 1, "fsdp": -1, "tensor": 1})
