"""Train an S2-Megatron model:  python train.py [group=preset ...] [key=value ...]

Configs live in conf/ (see conf/config.yaml for the groups and every key). Examples:

    python train.py                                    # tiny S2 model on the built-in corpus (CPU or GPU)
    python train.py model=125m sparsity=l16v16 train.seq_len=2048 train.out_dir=outputs/125m
    torchrun --nproc_per_node=4 train.py model=125m parallel.tp=2 parallel.pp=2 train.global_batch=16

Running again with the same train.out_dir resumes from its latest complete checkpoint. With --multirun, job N of a
sweep writes to <train.out_dir>/N (for sweeps under torchrun or SLURM use launch/sweep.py).
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    from s2megatron.training import ConfigError, plan_run, quiet_import_warnings, run

    quiet_import_warnings()
    if HydraConfig.get().mode == RunMode.MULTIRUN:   # one out_dir per sweep job, never a shared (resumed) one
        cfg.train.out_dir = HydraConfig.get().runtime.output_dir
    try:
        plan = plan_run(cfg)   # validates the whole config before anything heavy
    except ConfigError as err:
        print(f"train.py: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    run(cfg, plan)


# The guard matters: dist_checkpointing's writer starts a "spawn" manager that re-imports __main__.
if __name__ == "__main__":
    main()
