"""The stand-in experiment (tests/toy.py): seconds on CPU; used by the train tests."""
from calico_jax.train.config import CheckpointConfig, OptimConfig
from tests.toy import ToyExperiment


def get_config() -> ToyExperiment:
    return ToyExperiment(
        name="toy", optim=OptimConfig(learning_rate=1e-2, warmup_steps=2, decay="cosine", weight_decay=0.01),
        checkpoint=CheckpointConfig(max_to_keep=3),
        total_steps=12, checkpoint_every=4, log_every=1, seed=0, batch_size=8,
        mesh={"data": -1, "fsdp": 1, "tensor": 1}, progress=False)
