"""Training application: config validation, the loop, checkpoints, metrics and LR schedule.

    from s2megatron.training import plan_run, run, Trainer
    result = run(cfg)              # cfg: the composed Hydra config (conf/config.yaml)

Modules: config (start-up validation -> RunPlan), distributed (process group, device), build (model chunks, DDP,
optimizer), step (one step / evaluation through megatron-core's pipeline schedules), lr_schedule, checkpoint
(crash-safe dist_checkpointing with manifest), metrics (progress line, metrics.jsonl, TensorBoard, MFU), signals
(graceful SIGINT/SIGTERM), trainer (the loop).
"""
from .config import ConfigError, RunPlan, plan_run

__all__ = ["ConfigError", "RunPlan", "Trainer", "TrainResult", "load_for_eval", "plan_run", "quiet_import_warnings",
           "run"]


def __getattr__(name):
    # Keeps `import s2megatron.training` light: train.py validates the config before anything heavy is loaded.
    if name in ("Trainer", "TrainResult", "run", "load_for_eval", "quiet_import_warnings"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
