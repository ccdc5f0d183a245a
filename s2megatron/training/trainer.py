"""The training loop: the recipe in one place.

    plan = plan_run(cfg)                    validate everything before heavy work
    trainer = Trainer(cfg, plan)
    trainer.setup()                         process groups, data, model chunks (DDP), optimizer
    result = trainer.train()                resume, steps, logs, evals, checkpoints, passkey
    trainer.close()

or simply ``run(cfg)``. ``TrainResult.step_times_s`` gives per-step wall times for benchmarks.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from .config import RunPlan, plan_run
from .lr_schedule import LRSchedule
from .metrics import MetricsLogger, memory_gib, peak_flops_per_s

log = logging.getLogger("s2megatron")


@dataclass
class TrainResult:
    """What a call to :meth:`Trainer.train` did. ``losses``/``step_times_s`` hold one entry per step run in this
    call (``first_step`` is the step number of the first entry, 1-based)."""

    first_step: int
    final_step: int
    losses: List[float] = field(default_factory=list)
    grad_norms: List[float] = field(default_factory=list)
    step_times_s: List[float] = field(default_factory=list)
    tokens_per_step: int = 0
    resumed_from: Optional[str] = None
    stopped_by_signal: bool = False
    validation: Optional[Dict] = None
    passkey: Optional[Dict] = None
    wall_s: float = 0.0


def quiet_import_warnings():
    """megatron-core announces each fallback it takes without apex/Transformer Engine (and some deprecations) with
    warnings at import time; they say nothing about the run. Command-line entry points call this first."""
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\.")


def configure_logging(rank: int):
    """INFO lines from rank 0 only; keep megatron-core's own INFO chatter out of the progress output."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("s2megatron").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("megatron").setLevel(logging.WARNING)


def _cfg_to_yaml(cfg) -> str:
    from omegaconf import OmegaConf
    return OmegaConf.to_yaml(cfg, resolve=True)


class Trainer:
    """Owns the process groups, data, model chunks, optimizer and checkpoints of one run.

    ``cfg``: the composed config (see conf/config.yaml); ``plan``: :func:`plan_run` of it (computed if None).
    """

    def __init__(self, cfg, plan: Optional[RunPlan] = None):
        self.cfg = cfg
        self.plan = plan or plan_run(cfg)
        self.step = 0                 # optimizer steps done
        self.consumed_samples = 0     # global training samples consumed
        self.optimizer = None
        self.metrics: Optional[MetricsLogger] = None
        self._last_saved_step = None
        self.on_step_end = None       # optional callable(step), after each optimizer step (e.g. a profiler's step)

    # ------------------------------------------------------------------------------------------ set-up
    def setup(self, *, training: bool = True) -> "Trainer":
        """Process groups, tokenizer and datasets, model chunks, optimizer (``training``) or bare model (eval)."""
        configure_logging(int(os.environ.get("RANK", "0")))   # before megatron-core's import-time messages
        from megatron.core import parallel_state as ps

        from ..data import MicroBatchLoader  # noqa: F401  (import check before the expensive part)
        from ..model import initialize_parallel
        from .build import build_model, build_optimizer, build_transformer_config
        from .distributed import init_distributed

        cfg, plan = self.cfg, self.plan
        self.env = init_distributed()
        initialize_parallel(plan.tp, plan.pp, plan.vpp, seed=cfg.train.seed)
        self.device = self.env.device
        self.dp_rank = ps.get_data_parallel_rank()

        t0 = time.perf_counter()
        if training:
            from ..data import build_data_from_config
            gb = cfg.train.global_batch
            self.tokenizer, self.train_ds, self.valid_ds = build_data_from_config(
                cfg.data, seq_len=cfg.train.seq_len, seed=cfg.train.seed,
                num_train_samples=cfg.train.steps * gb, num_valid_samples=max(cfg.train.eval_iters, 1) * gb)
        else:
            from ..data import S2Tokenizer
            from ..data.config import resolve_data_config
            self.tokenizer = S2Tokenizer(resolve_data_config(cfg.data).tokenizer_model)
        log.info(f"data ready in {time.perf_counter() - t0:.1f}s (vocab {self.tokenizer.vocab_size})")
        if cfg.eval.passkey.enabled:
            from ..eval.passkey import check_context_lengths
            check_context_lengths(self.tokenizer, plan.passkey_context_lengths)

        self.tf_config = build_transformer_config(cfg, plan)
        self.model = build_model(cfg, plan, self.tf_config, vocab_size=self.tokenizer.vocab_size,
                                 device=self.device, wrap_ddp=training)
        num_chunks = len(self.model)
        self.reads_data = [ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=i if plan.vpp else None)
                           or ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=i if plan.vpp else None)
                           for i in range(num_chunks)]
        if training:
            self.optimizer = build_optimizer(cfg, plan, self.tf_config, self.model)
            o = cfg.optim
            self.lr_schedule = LRSchedule(lr=float(o.lr), min_lr=float(o.min_lr), warmup_steps=int(o.warmup_steps),
                                          decay_steps=int(o.decay_steps or cfg.train.steps),
                                          decay_style=o.decay_style, weight_decay=float(o.weight_decay))
        self.ckpt = CheckpointManager(os.path.join(cfg.train.out_dir, "ckpt"), keep=cfg.train.keep_checkpoints,
                                      verify_sha256=cfg.train.verify_checkpoint)
        return self

    def close(self):
        from ..model import destroy_parallel
        from .distributed import destroy_distributed

        if self.metrics is not None:
            self.metrics.close()
        destroy_parallel()
        destroy_distributed(self.env)

    # ------------------------------------------------------------------------------------------ data
    def _loaders(self, dataset, consumed_samples: int) -> list:
        """One micro-batch iterator per model chunk that reads data (None for the others)."""
        from ..data import MicroBatchLoader

        return [MicroBatchLoader(dataset, self.cfg.train.micro_batch, self.dp_rank, self.plan.dp, consumed_samples,
                                 num_workers=int(self.cfg.data.get("num_workers", 0) or 0)) if reads else None
                for reads in self.reads_data]

    # ------------------------------------------------------------------------------------------ checkpoints
    def _unwrapped(self) -> list:
        from megatron.core.utils import unwrap_model
        return unwrap_model(self.model)

    def sharded_state_dict(self, *, is_loading: bool, with_optimizer: bool = True,
                           optim_format: Optional[str] = None) -> Dict:
        """Model (and optimizer) sharded state dict; chunks keyed ``model`` (or ``model0``, ``model1``, ... with
        virtual stages). Tensor keys are global, so any tensor/pipeline split can load the model. The distributed
        optimizer's state is stored as ``optim_format`` (default ``train.ckpt_optim_format``)."""
        chunks = self._unwrapped()
        state = ({"model": chunks[0].sharded_state_dict()} if len(chunks) == 1
                 else {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)})
        if with_optimizer and self.optimizer is not None:
            metadata = None
            if self.cfg.parallel.get("distributed_optimizer", False):
                metadata = {"distrib_optim_sharding_type": optim_format or self.cfg.train.ckpt_optim_format}
            state["optimizer"] = self.optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
        return state

    def save(self) -> str:
        """Checkpoint the current step (collective)."""
        t0 = time.perf_counter()
        train_state = {"iteration": self.step, "consumed_samples": self.consumed_samples,
                       "world_size": self.env.world_size, "tp": self.plan.tp, "pp": self.plan.pp,
                       "vpp": self.plan.vpp, "dp": self.plan.dp, "seed": self.cfg.train.seed,
                       "optim_format": (self.cfg.train.ckpt_optim_format
                                        if self.cfg.parallel.get("distributed_optimizer", False) else None),
                       "lr": self.lr_schedule.lr_at(max(self.step - 1, 0)), "time": time.time()}
        path = self.ckpt.save(self.step, self.sharded_state_dict(is_loading=False), train_state=train_state,
                              rank_state=capture_rng_state(), extra_files={"config.yaml": _cfg_to_yaml(self.cfg)})
        self._last_saved_step = self.step
        log.info(f"saved checkpoint {path} in {time.perf_counter() - t0:.1f}s")
        return path

    def load(self, path: str, *, with_optimizer: bool = True) -> Dict:
        """Load model (and optimizer, step, data position, RNG) from checkpoint ``path`` (collective)."""
        t0 = time.perf_counter()
        saved = self.ckpt.read_train_state(path)
        if with_optimizer and self.optimizer is not None:
            from .build import init_optimizer_state
            init_optimizer_state(self.optimizer)
        template = self.sharded_state_dict(is_loading=True, with_optimizer=with_optimizer,
                                           optim_format=saved.get("optim_format"))
        state, train_state, rank_state = self.ckpt.load(path, template)
        for i, chunk in enumerate(self._unwrapped()):
            chunk.load_state_dict(state["model"] if len(self.model) == 1 else state[f"model{i}"])
        if with_optimizer and self.optimizer is not None:
            from .build import load_optimizer_state
            load_optimizer_state(self.optimizer, state["optimizer"])
            self.step = int(train_state["iteration"])
            self.consumed_samples = int(train_state["consumed_samples"])
            same_layout = all(train_state.get(k) == v for k, v in
                              (("tp", self.plan.tp), ("pp", self.plan.pp), ("vpp", self.plan.vpp),
                               ("dp", self.plan.dp)))
            if rank_state is not None and same_layout:
                restore_rng_state(rank_state)
            else:
                torch.manual_seed(self.cfg.train.seed + 1000003 * self.step + self.env.rank)
                log.info("parallel layout differs from the checkpoint's: RNG streams reseeded")
        log.info(f"loaded checkpoint {path} (step {train_state['iteration']}) in {time.perf_counter() - t0:.1f}s")
        return train_state

    # ------------------------------------------------------------------------------------------ evaluation
    def validate(self) -> Optional[Dict]:
        from .step import evaluate

        if self.valid_ds is None or self.cfg.train.eval_iters == 0:
            return None
        out = evaluate(self.model, lambda: self._loaders(self.valid_ds, 0), num_batches=self.cfg.train.eval_iters,
                       num_microbatches=self.plan.num_microbatches, seq_len=self.cfg.train.seq_len,
                       micro_batch=self.cfg.train.micro_batch, device=self.device)
        if self.metrics is not None:
            self.metrics.log_eval(self.step, loss=out["loss"], ppl=out["ppl"])
        return out

    def passkey(self):
        """Passkey retrieval over the configured grid (collective); a :class:`PasskeyResult`."""
        from ..eval.passkey import evaluate_passkey
        from .step import score_sequences

        p = self.cfg.eval.passkey
        pad = self.plan.tp if self.cfg.parallel.get("sp", False) else 1
        return evaluate_passkey(
            lambda batch: score_sequences(self.model, batch, device=self.device, reads_data=self.reads_data),
            self.tokenizer, context_lengths=self.plan.passkey_context_lengths, depths=list(p.depths),
            samples_per_cell=int(p.samples_per_cell), num_distractors=int(p.num_distractors), seed=int(p.seed),
            pad_to_multiple=pad, max_len=self.cfg.train.seq_len)

    # ------------------------------------------------------------------------------------------ the loop
    def _prepare_outputs(self):
        out_dir = self.cfg.train.out_dir
        main = self.env.is_main
        if main:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "config.yaml"), "w") as f:
                f.write(_cfg_to_yaml(self.cfg))
        self.metrics = MetricsLogger(out_dir, total_steps=self.cfg.train.steps, enabled=main)

    def _maybe_resume(self) -> Optional[str]:
        t = self.cfg.train
        if not (t.resume or t.resume_from):
            if self.ckpt.complete():
                log.warning(f"train.resume=false: starting afresh although {self.ckpt.root} holds checkpoints "
                            f"{self.ckpt.complete()}; new saves replace the ones with the same step")
            return None
        path = self.ckpt.find_resume(t.resume_from, fallback=bool(t.resume_fallback))
        if path is None:
            return None
        self.load(path)
        self._last_saved_step = self.step
        return path

    def _describe(self):
        from ..model import num_model_flops_per_token, padded_vocab_size

        cfg, plan = self.cfg, self.plan
        params = sum(p.numel() for c in self._unwrapped() for p in c.parameters())
        vocab = padded_vocab_size(self.tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by, plan.tp)
        self.flops_per_token = num_model_flops_per_token(cfg.model, cfg.train.seq_len, vocab_size=vocab)
        log.info(f"model: {params / 1e6:.2f}M parameters on this rank | layers: {plan.schedule.describe()} | "
                 f"attention backend: {cfg.attention.backend}")
        log.info(f"parallel: world {plan.world_size} = tp {plan.tp} x pp {plan.pp}"
                 f"{f' (vpp {plan.vpp})' if plan.vpp else ''} x dp {plan.dp} | precision {plan.precision} | "
                 f"{plan.num_microbatches} micro-batches of {cfg.train.micro_batch} x {cfg.train.seq_len} tokens "
                 f"per rank per step ({plan.tokens_per_step:,} tokens per step) | device {self.device}")

    def train(self) -> TrainResult:
        """Run (or resume) the loop to ``train.steps``, with logging, evaluation, checkpoints and graceful stop."""
        from .signals import StopSignal
        from .step import train_step

        t_start = time.perf_counter()
        cfg, t = self.cfg, self.cfg.train
        self._prepare_outputs()
        resumed = self._maybe_resume()
        self._describe()
        result = TrainResult(first_step=self.step + 1, final_step=self.step, tokens_per_step=self.plan.tokens_per_step,
                             resumed_from=resumed)
        if self.step >= t.steps:
            log.info(f"already trained {self.step} steps (train.steps={t.steps}): nothing to train; raise "
                     "train.steps to continue or use another train.out_dir")
        peak = peak_flops_per_s(self.device, self.plan.precision)
        iterators = self._loaders(self.train_ds, self.consumed_samples) if self.step < t.steps else None
        window = {"loss": 0.0, "grad_norm": 0.0, "time": 0.0, "steps": 0}
        validation = None
        with StopSignal(self.device) as stop:
            while self.step < t.steps:
                lr = self.lr_schedule.apply(self.optimizer, self.step)
                t0 = time.perf_counter()
                out = train_step(self.model, self.optimizer, iterators, num_microbatches=self.plan.num_microbatches,
                                 seq_len=t.seq_len, micro_batch=t.micro_batch, device=self.device,
                                 check_finite=self.plan.precision != "fp16", step=self.step + 1)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.step += 1
                self.consumed_samples += t.global_batch
                result.losses.append(out.loss)
                result.grad_norms.append(out.grad_norm)
                result.step_times_s.append(dt)
                if self.on_step_end is not None:
                    self.on_step_end(self.step)
                if not math.isfinite(out.loss):
                    raise FloatingPointError(f"loss is {out.loss} at step {self.step}; lower optim.lr or check data")
                for key, value in (("loss", out.loss), ("grad_norm", out.grad_norm), ("time", dt), ("steps", 1)):
                    window[key] += value
                if self.step % t.log_interval == 0 or self.step == t.steps:
                    self._log_window(window, lr, peak, result)
                    window = dict.fromkeys(window, 0.0)
                validation = None
                if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.steps:
                    validation = self.validate()
                stopping = stop.requested()
                if stopping or (t.save_interval and self.step % t.save_interval == 0):
                    self.save()
                if stopping:
                    log.warning(f"stopped by {stop.received or 'a signal on another rank'} after step {self.step}")
                    result.stopped_by_signal = True
                    break
        result.final_step = self.step
        if t.save_on_exit and self._last_saved_step != self.step and self.step > 0:
            self.save()
        if not result.stopped_by_signal:
            result.validation = validation if validation is not None else self.validate()
            if cfg.eval.passkey.enabled:
                result.passkey = self._final_passkey()
        result.wall_s = time.perf_counter() - t_start
        self._write_summary(result)
        return result

    def _log_window(self, window: Dict, lr: float, peak: Optional[float], result: TrainResult):
        n = int(window["steps"])
        tokens_per_s = n * self.plan.tokens_per_step / window["time"]
        mfu = None if peak is None else self.flops_per_token * tokens_per_s / (peak * self.plan.world_size)
        times = result.step_times_s[1:] or result.step_times_s
        eta = (self.cfg.train.steps - self.step) * sum(times) / len(times)
        self.metrics.log_train(self.step, loss=window["loss"] / n, lr=lr, grad_norm=window["grad_norm"] / n,
                               tokens_per_s=tokens_per_s, mfu=mfu, mem_gib=memory_gib(self.device),
                               step_time_s=window["time"] / n, consumed_samples=self.consumed_samples, eta_s=eta)

    def _final_passkey(self) -> Dict:
        from ..eval.passkey import write_report

        t0 = time.perf_counter()
        res = self.passkey()
        summary = {"accuracy": res.accuracy, "chance": res.chance}
        if self.env.is_main:
            out = os.path.join(self.cfg.train.out_dir, "passkey")
            write_report(res, out, title=f"Passkey retrieval at step {self.step}")
            self.metrics.log_scalars(self.step, "passkey", accuracy=res.accuracy, chance=res.chance)
            log.info(f"passkey retrieval: {res.accuracy:.1%} (chance {res.chance:.1%}) over "
                     f"{len(res.lengths())} lengths x {len(res.depths())} depths in {time.perf_counter() - t0:.1f}s; "
                     f"table in {out}/passkey.md")
            log.info("\n" + res.to_markdown(f"Passkey retrieval at step {self.step}"))
        return dict(summary, table=res.to_json())

    def _write_summary(self, result: TrainResult):
        if not self.env.is_main:
            return
        summary = {"final_step": result.final_step, "steps_run": len(result.losses),
                   "first_loss": result.losses[0] if result.losses else None,
                   "last_loss": result.losses[-1] if result.losses else None,
                   "validation": result.validation,
                   "passkey_accuracy": (result.passkey or {}).get("accuracy"),
                   "resumed_from": result.resumed_from, "stopped_by_signal": result.stopped_by_signal,
                   "wall_s": result.wall_s,
                   "mean_step_s": (sum(result.step_times_s) / len(result.step_times_s)
                                   if result.step_times_s else None)}
        with open(os.path.join(self.cfg.train.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if result.validation:
            log.info(f"done: step {result.final_step}, validation loss {result.validation['loss']:.4f} "
                     f"(ppl {result.validation['ppl']:.2f}), wall {result.wall_s:.0f}s")


def run(cfg, plan: Optional[RunPlan] = None) -> TrainResult:
    """Validate, set up, train, tear down. The programmatic entry point (``train.py`` calls it)."""
    plan = plan or plan_run(cfg)
    trainer = Trainer(cfg, plan)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        if hasattr(trainer, "env"):
            trainer.close()


class EvalSession:
    """A model loaded from a checkpoint for evaluation (see :func:`load_for_eval`)."""

    def __init__(self, trainer: Trainer, checkpoint: str):
        self.trainer = trainer
        self.checkpoint = checkpoint

    @property
    def is_main(self) -> bool:
        return self.trainer.env.is_main

    def passkey(self):
        return self.trainer.passkey()


@contextlib.contextmanager
def load_for_eval(ckpt_dir: str, overrides=None):
    """Rebuild the model of checkpoint ``ckpt_dir`` (or of the latest checkpoint of a run directory) from the config
    saved with it, load its weights, yield an :class:`EvalSession`. ``overrides``: an OmegaConf/dict of config
    values to change (e.g. ``parallel.tp``, ``eval.passkey.depths``); the split defaults to tp = pp = 1."""
    from omegaconf import OmegaConf

    from .checkpoint import MANIFEST

    path = os.path.abspath(ckpt_dir)
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        found = CheckpointManager(os.path.join(path, "ckpt")).latest() if os.path.isdir(os.path.join(path, "ckpt")) \
            else None
        if found is None:
            raise FileNotFoundError(f"ckpt_dir={ckpt_dir!r} is neither a checkpoint (no {MANIFEST}) nor a run "
                                    "directory with checkpoints in ckpt/")
        path = os.path.join(path, "ckpt", found)
    cfg = OmegaConf.load(os.path.join(path, "config.yaml"))
    defaults = OmegaConf.create({"parallel": {"tp": 1, "pp": 1, "vpp": None, "sp": False,
                                              "distributed_optimizer": False},
                                 "train": {"precision": "auto"}, "eval": {"passkey": {"enabled": True}}})
    cfg = OmegaConf.merge(cfg, defaults, overrides or {})
    cfg.train.out_dir = os.path.dirname(os.path.dirname(path))
    trainer = Trainer(cfg, plan_run(cfg))
    try:
        trainer.setup(training=False)
        problem = trainer.ckpt.verify(path)
        if problem:
            from .checkpoint import CheckpointCorruptError
            raise CheckpointCorruptError(f"checkpoint {path} is corrupt ({problem})")
        trainer.load(path, with_optimizer=False)
        yield EvalSession(trainer, path)
    finally:
        trainer.close()
