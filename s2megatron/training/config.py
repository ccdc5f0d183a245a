"""Start-up validation of the whole run config, before any heavy work (no process group, no model, no data).

:func:`plan_run` checks every group against the others (batch vs. data-parallel size, heads vs. tensor
parallel size, layers vs. pipeline stages, sparsity layouts, backend, precision, ...) and returns a
:class:`RunPlan` with the derived quantities the loop needs. Every problem raises :class:`ConfigError`
(a ValueError) naming the offending value and what would be valid; all problems found are reported together.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

from ..ops import BACKENDS
from ..sparsity import CoverageWarning, LayerSchedule, density

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
RECOMPUTE = (None, "selective", "full")
DECAY_STYLES = ("cosine", "linear", "constant")
DATA_KINDS = ("builtin", "indexed")
CKPT_OPTIM_FORMATS = ("fully_reshardable", "dp_reshardable")


class ConfigError(ValueError):
    """One or more invalid config values; the message lists each with what would be valid."""


@dataclass(frozen=True)
class RunPlan:
    """What the validated config implies for this launch.

    ``num_microbatches`` = global_batch / (micro_batch * dp): micro-batches each data-parallel rank
    accumulates per optimizer step. ``precision`` is resolved (never ``auto``).
    """

    world_size: int
    tp: int
    pp: int
    vpp: Optional[int]
    dp: int
    num_microbatches: int
    precision: str
    device_type: str          # "cuda" | "cpu"
    fusions: bool             # fused elementwise kernels (``train.fusions`` resolved)
    schedule: LayerSchedule
    tokens_per_step: int
    passkey_context_lengths: tuple


def _get(cfg: Any, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return default
        node = node.get(part, None) if hasattr(node, "get") else getattr(node, part, None)
    return default if node is None else node


def _to_plain(node):
    """OmegaConf nodes -> plain containers (leaves plain Python values alone)."""
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return node


def resolve_fusions(fusions, device_type: str) -> bool:
    """``train.fusions``: ``auto`` means on with CUDA, off on the CPU."""
    return device_type == "cuda" if fusions == "auto" else bool(fusions)


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` -> bf16 on CUDA, fp32 on CPU; other values pass through."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


class _Errors:
    def __init__(self):
        self.items: List[str] = []

    def add(self, msg: str):
        self.items.append(msg)

    def int_at_least(self, name: str, value, low: int) -> bool:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self.add(f"{name}={value!r} is invalid; valid: an integer >= {low}")
            return False
        return True

    def number_in(self, name: str, value, low: float, high: float = float("inf"), *, low_open=False) -> bool:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (value > low if low_open else value >= low) and value <= high
        if not ok:
            lo = f"> {low}" if low_open else f">= {low}"
            hi = "" if high == float("inf") else f" and <= {high}"
            self.add(f"{name}={value!r} is invalid; valid: a number {lo}{hi}")
        return ok

    def choice(self, name: str, value, valid) -> bool:
        if value not in valid:
            self.add(f"{name}={value!r} is invalid; valid: {' | '.join(str(v) for v in valid)}")
            return False
        return True

    def raise_if_any(self):
        if self.items:
            if len(self.items) == 1:
                raise ConfigError(self.items[0])
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(self.items))


def plan_run(cfg: Mapping, *, world_size: Optional[int] = None, device_type: Optional[str] = None) -> RunPlan:
    """Validate ``cfg`` (the composed Hydra config) for a launch of ``world_size`` processes on ``device_type``.

    ``world_size`` defaults to ``$WORLD_SIZE`` (torchrun) or 1; ``device_type`` to ``cuda`` when a GPU is
    visible, else ``cpu``. Raises :class:`ConfigError` listing every invalid value.
    """
    import torch

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    err = _Errors()

    # --- train
    t = lambda key: _get(cfg, f"train.{key}")  # noqa: E731
    for key, low in (("steps", 1), ("seq_len", 1), ("micro_batch", 1), ("global_batch", 1), ("log_interval", 1),
                     ("save_interval", 0), ("eval_interval", 0), ("eval_iters", 0), ("recompute_num_layers", 1),
                     ("keep_checkpoints", 1)):
        err.int_at_least(f"train.{key}", t(key), low)
    if not isinstance(t("seed"), int) or isinstance(t("seed"), bool):
        err.add(f"train.seed={t('seed')!r} is invalid; valid: an integer")
    if not t("out_dir"):
        err.add("train.out_dir is empty; valid: a directory path")
    precision = t("precision")
    err.choice("train.precision", precision, PRECISIONS)
    err.choice("train.recompute", t("recompute"), RECOMPUTE)
    err.choice("train.ckpt_optim_format", t("ckpt_optim_format"), CKPT_OPTIM_FORMATS)
    if precision == "fp16" and device_type == "cpu":
        err.add("train.precision=fp16 is not supported on CPU; valid here: auto | fp32 | bf16")
    fusions = t("fusions") if t("fusions") is not None else "auto"
    if not (fusions == "auto" or isinstance(fusions, bool)):
        err.add(f"train.fusions={fusions!r} is invalid; valid: auto | true | false")
    elif fusions is True and device_type == "cpu":
        err.add("train.fusions=true needs CUDA (the fused kernels are generated for the GPU); valid here: auto | "
                "false")

    # --- optim
    o = lambda key: _get(cfg, f"optim.{key}")  # noqa: E731
    if err.number_in("optim.lr", o("lr"), 0.0, low_open=True) and o("min_lr") is not None:
        err.number_in("optim.min_lr", o("min_lr"), 0.0, o("lr"))
    err.int_at_least("optim.warmup_steps", o("warmup_steps") if o("warmup_steps") is not None else 0, 0)
    err.choice("optim.decay_style", o("decay_style"), DECAY_STYLES)
    if o("decay_steps") is not None:
        err.int_at_least("optim.decay_steps", o("decay_steps"), 1)
    err.number_in("optim.weight_decay", o("weight_decay") or 0.0, 0.0)
    for beta in ("beta1", "beta2"):
        if o(beta) is not None and not (isinstance(o(beta), (int, float)) and 0.0 <= o(beta) < 1.0):
            err.add(f"optim.{beta}={o(beta)!r} is invalid; valid: a number in [0, 1)")
    err.number_in("optim.eps", o("eps") if o("eps") is not None else 1e-8, 0.0, low_open=True)
    err.number_in("optim.clip_grad", o("clip_grad") or 0.0, 0.0)

    # --- parallel
    p = lambda key: _get(cfg, f"parallel.{key}")  # noqa: E731
    tp, pp, vpp, cp = p("tp") or 1, p("pp") or 1, p("vpp"), p("cp") or 1
    ok_par = err.int_at_least("parallel.tp", tp, 1) & err.int_at_least("parallel.pp", pp, 1)
    if vpp is not None:
        ok_par &= err.int_at_least("parallel.vpp", vpp, 2)
        if ok_par and pp == 1:
            err.add(f"parallel.vpp={vpp} needs parallel.pp > 1 (interleaved pipeline); valid with pp=1: null")
            ok_par = False
    if cp != 1:
        err.add(f"parallel.cp={cp!r} is not supported; valid: 1 (context parallelism is not implemented)")
    if not isinstance(p("sp") or False, bool):
        err.add(f"parallel.sp={p('sp')!r} is invalid; valid: true | false")
    elif p("sp") and tp == 1:
        err.add("parallel.sp=true needs parallel.tp > 1 (sequence parallelism splits activations over the "
                "tensor-parallel ranks); valid with tp=1: parallel.sp=false")
    dp = 1
    if ok_par:
        if world_size % (tp * pp):
            err.add(f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {tp} * {pp} = {tp * pp}; "
                    f"launch a multiple of {tp * pp} processes or choose tp * pp dividing {world_size}")
            ok_par = False
        else:
            dp = world_size // (tp * pp)

    # --- batch
    num_microbatches = 1
    mb, gb = t("micro_batch"), t("global_batch")
    if ok_par and isinstance(mb, int) and isinstance(gb, int) and mb >= 1 and gb >= 1:
        if gb % (mb * dp):
            lo = mb * dp
            err.add(f"train.global_batch={gb} is not divisible by train.micro_batch * dp = {mb} * {dp} = {lo}; "
                    f"valid global_batch: multiples of {lo} (e.g. {lo}, {2 * lo}), or change micro_batch")
        else:
            num_microbatches = gb // (mb * dp)
            if vpp and num_microbatches % pp:
                err.add(f"the interleaved pipeline (parallel.vpp={vpp}) needs the micro-batches per step, "
                        f"global_batch / (micro_batch * dp) = {num_microbatches}, to be a multiple of "
                        f"parallel.pp={pp}; valid global_batch: multiples of {pp * mb * dp}")

    # --- model
    m = lambda key: _get(cfg, f"model.{key}")  # noqa: E731
    layers, heads, hidden = m("num_layers"), m("num_attention_heads"), m("hidden_size")
    groups = m("num_query_groups") or heads
    ok_model = (err.int_at_least("model.num_layers", layers, 1)
                & err.int_at_least("model.num_attention_heads", heads, 1)
                & err.int_at_least("model.hidden_size", hidden, 1))
    if ok_model:
        if isinstance(groups, int) and heads % groups:
            err.add(f"model.num_query_groups={groups} must divide model.num_attention_heads={heads}")
        if m("kv_channels") is None and hidden % heads:
            err.add(f"model.hidden_size={hidden} is not divisible by model.num_attention_heads={heads}; "
                    "set model.kv_channels or choose a divisor")
        if ok_par and heads % tp:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            err.add(f"parallel.tp={tp} does not divide model.num_attention_heads={heads}; valid tp: {divisors}")
        elif ok_par and isinstance(groups, int) and groups % tp and tp % groups:
            err.add(f"parallel.tp={tp} and model.num_query_groups={groups}: one must divide the other (kv heads "
                    "are split over tensor-parallel ranks, or replicated when fewer than the ranks)")
        ffn = m("ffn_hidden_size")
        if ok_par and isinstance(ffn, int) and ffn % tp:
            err.add(f"parallel.tp={tp} does not divide model.ffn_hidden_size={ffn}")
        stages = pp * (vpp or 1)
        if ok_par and layers % stages:
            err.add(f"model.num_layers={layers} is not divisible by the pipeline stages parallel.pp * vpp = {stages}; "
                    f"valid pp * vpp: divisors of {layers}")

    # --- sequence
    seq_len = t("seq_len")
    if ok_par and isinstance(seq_len, int) and (p("sp") or False) and tp > 1 and seq_len % tp:
        err.add(f"train.seq_len={seq_len} is not divisible by parallel.tp={tp}, which sequence parallelism "
                f"(parallel.sp=true) needs; valid seq_len: multiples of {tp}")
    max_pos = m("max_position_embeddings")
    if isinstance(seq_len, int) and isinstance(max_pos, int) and seq_len > max_pos:
        err.add(f"train.seq_len={seq_len} exceeds model.max_position_embeddings={max_pos}")

    # --- attention
    backend = _get(cfg, "attention.backend", "auto")
    if err.choice("attention.backend", backend, BACKENDS) and backend == "triton":
        from ..ops import triton_available
        if not triton_available():
            err.add("attention.backend=triton needs a CUDA GPU with Triton (or TRITON_INTERPRET=1 for the CPU "
                    "interpreter); valid here: auto | reference | sdpa (dense layouts)")

    # --- sparsity
    schedule = None
    if ok_model:
        sparsity = _to_plain(_get(cfg, "sparsity"))
        if not isinstance(sparsity, Mapping):
            err.add(f"sparsity={sparsity!r} is invalid; valid: a preset (dense | l16v16 | l8v16 | phi3_small | "
                    "hybrid | l4v4) or a mapping with 'default'")
        else:
            try:
                schedule = LayerSchedule.from_config(sparsity, layers)
            except ValueError as e:
                err.add(f"sparsity: {e}")
        if schedule is not None and backend == "sdpa":
            sparse = [i for i, lay in enumerate(schedule.layouts) if not lay.is_dense]
            if sparse:
                err.add(f"attention.backend=sdpa computes dense attention only, but layers {sparse} are sparse "
                        f"({schedule.describe()}); valid: auto | triton | reference, or sparsity=dense")
        if schedule is not None and isinstance(seq_len, int) and ok_par and heads % tp == 0 \
                and os.environ.get("RANK", "0") == "0":   # one warning per job, not per rank
            _check_coverage(schedule, heads, groups, seq_len)

    # --- data
    err.choice("data.kind", _get(cfg, "data.kind"), DATA_KINDS)

    # --- passkey eval
    lengths = ()
    if _get(cfg, "eval.passkey.enabled", False) and isinstance(seq_len, int):
        raw = _to_plain(_get(cfg, "eval.passkey.context_lengths"))
        lengths = tuple(raw) if raw else default_passkey_lengths(seq_len)
        bad = [n for n in lengths if not isinstance(n, int) or n < 1 or n > seq_len]
        if bad:
            err.add(f"eval.passkey.context_lengths has {bad}; valid: integers in 1..train.seq_len={seq_len}")
        depths = _to_plain(_get(cfg, "eval.passkey.depths")) or []
        if not depths or any(not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in depths):
            err.add(f"eval.passkey.depths={depths!r} is invalid; valid: a non-empty list of numbers in [0, 1]")
        err.int_at_least("eval.passkey.samples_per_cell", _get(cfg, "eval.passkey.samples_per_cell"), 1)
        err.int_at_least("eval.passkey.num_distractors", _get(cfg, "eval.passkey.num_distractors"), 1)

    err.raise_if_any()
    resolved = resolve_precision(precision, device_type)
    return RunPlan(world_size=world_size, tp=tp, pp=pp, vpp=vpp, dp=dp, num_microbatches=num_microbatches,
                   precision=resolved, device_type=device_type, fusions=resolve_fusions(fusions, device_type),
                   schedule=schedule,
                   tokens_per_step=gb * seq_len, passkey_context_lengths=tuple(lengths))


def default_passkey_lengths(seq_len: int) -> tuple:
    """``[seq_len/4, seq_len/2, seq_len]`` (distinct, >= 64 tokens where possible)."""
    return tuple(sorted({max(min(64, seq_len), seq_len // 4), max(min(64, seq_len), seq_len // 2), seq_len}))


def _check_coverage(schedule: LayerSchedule, heads: int, groups: int, seq_len: int):
    """Warn once per distinct sparse layout whose heads together leave part of the context unattended."""
    seen = set()
    for layout in schedule.layouts:
        if layout.is_dense or layout in seen:
            continue
        seen.add(layout)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CoverageWarning)
            density(layout, heads, seq_len, num_kv_heads=groups, total_heads=heads, total_kv_heads=groups)
        for w in caught:
            warnings.warn(str(w.message), CoverageWarning, stacklevel=3)
