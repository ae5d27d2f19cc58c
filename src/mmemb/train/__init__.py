"""The generic contrastive engine: config, data mixture, losses, the GradCache step, the trainer,
checkpoints (accelerate: DDP / FSDP / DeepSpeed). It knows nothing of the method's stages.

``from mmemb.train import train, Trainer, load_config`` loads the trainer on first use.
"""

_TRAINER = {"train", "Trainer", "TrainingDiverged", "RunExists"}
_CONFIG = {"TrainConfig", "load_config", "ConfigError"}


def __getattr__(name):
    if name in _TRAINER:
        from . import trainer

        return getattr(trainer, name)
    if name in _CONFIG:
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'mmemb.train' has no attribute {name!r}")


__all__ = sorted(_TRAINER | _CONFIG)
