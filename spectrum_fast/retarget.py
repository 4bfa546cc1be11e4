"""Re-targeting during training: rescan the live weights, move the selection, fix up the optimizer.

* :func:`scan_live` computes the SNRs of a live model's weights, one matrix at a time. Under FSDP2 each
  DTensor is gathered alone with ``full_tensor()``, under DeepSpeed ZeRO-3 each parameter alone with
  ``GatheredParameters([p])``; the model is never gathered whole. In a distributed run every rank
  takes part in every gather (they are collectives), but only one rank computes each matrix (dealt
  out largest first, balanced by cost, the same deal on every rank); the records are then exchanged,
  so every rank returns the same complete result.
* :func:`retarget` rescans, selects again and sets ``requires_grad``, then fixes the optimizer:
  modules that stay keep their optimizer state untouched, modules that leave lose theirs (freed) and
  their place in the param groups, modules that enter join the param groups with fresh state.
* :class:`SpectrumRetargetCallback` (a ``transformers.TrainerCallback``, built on first use so that
  importing this module does not import transformers) calls :func:`retarget` every N epochs or steps.

Supported: plain models, FSDP2 (``fully_shard``), PEFT-free full-weight training. Refused with a clear
error: DeepSpeed ZeRO-3 (its optimizer flattens the trainable parameters at ``deepspeed.initialize``
and cannot take new ones), DDP (it registers the trainable parameters when it wraps the model; a
parameter unfrozen later would never be averaged across ranks), FSDP1 and LoRA adapters.
:func:`scan_live` alone also works under ZeRO-3 and DDP.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import __version__
from .apply import canonical_name
from .cpu_engine import STATUS_OK, matrix_stats
from .distributed import Context, exchange
from .errors import SpectrumError
from .lr import lr_ratios, new_group, no_decay, owner
from .naming import MOE_EXPERT, group_of, is_embedding, is_head, is_scanned_by_default, module_name, module_type, wants
from .result import MatrixRecord, ScanResult
from .scanner import DegenerateMatrixWarning
from .scheduling import cost, lpt
from .selection import validate_top

if TYPE_CHECKING:
    import torch

log = logging.getLogger("spectrum_fast")

ZERO3_UNSUPPORTED = (
    "retarget() does not support DeepSpeed ZeRO-3 (nor DeepSpeed's other ZeRO optimizers): they partition the "
    "trainable parameters into flat buffers at deepspeed.initialize() and cannot add or drop parameters later. "
    "scan_live(model) works under ZeRO-3: save a checkpoint, freeze with the new selection and start a new "
    "engine instead")
_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


# -- scanning the live weights ---------------------------------------------------------------------


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The unsharded shape: ZeRO-3 keeps it in ``ds_shape``; a DTensor reports its global shape."""
    ds = getattr(p, "ds_shape", None)
    return tuple(int(x) for x in (ds if ds is not None else p.shape))


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return False
    return isinstance(p, DTensor)


def _check_scannable(name: str) -> None:
    parts = name.split(".")
    if parts[-1] == "_flat_param" or "_fsdp_wrapped_module" in parts:
        raise SpectrumError("scan_live() does not support FSDP1 (its parameters are views of this rank's shard); "
                            "use FSDP2 (torch.distributed.fsdp.fully_shard) or scan a saved checkpoint")


def _live_matrices(model: torch.nn.Module, types: Sequence[str] | None, include_embeddings: bool,
                   routers: bool) -> list[tuple[str, torch.nn.Parameter, tuple[int, int]]]:
    """``(canonical tensor name, parameter, full shape)`` of every matrix the scan covers."""
    out = []
    for name, p in model.named_parameters():
        _check_scannable(name)
        parts = name.split(".")
        # PEFT: the frozen original beside a modules_to_save copy, and LoRA factors (rank-r, not weights)
        if "original_module" in parts or any(x.startswith("lora_") for x in parts):
            continue
        canon = canonical_name(name)
        shape = _full_shape(p)
        if wants(canon, shape, include_embeddings=include_embeddings, types=list(types) if types else None,
                 routers=routers):
            out.append((canon, p, (shape[0], shape[1])))
    return out


@contextlib.contextmanager
def _gathered(p: torch.Tensor) -> Iterator[torch.Tensor]:
    """The full value of one parameter, gathered alone where it is sharded (a collective there)."""
    import torch

    with torch.no_grad():
        if hasattr(p, "ds_id"):  # DeepSpeed ZeRO-3
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield p.data
        elif _is_dtensor(p):
            yield p.full_tensor()
        else:
            yield p.detach()


def _to_numpy(t: torch.Tensor):
    import torch

    return t.detach().to(device="cpu", dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).numpy()


_GLOO_GROUPS: dict[int, object] = {}


def _context() -> tuple[Context | None, bool]:
    """This rank's place in an initialised process group (None alone), and whether gathers are needed."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None, False
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None, False
    # records travel with all_gather_object: over gloo, also when training uses NCCL (created once)
    key = id(dist.group.WORLD)
    if key not in _GLOO_GROUPS:
        _GLOO_GROUPS[key] = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return Context(dist.get_rank(), dist.get_world_size(), _GLOO_GROUPS[key]), True


def scan_live(model: torch.nn.Module, *, types: Sequence[str] | None = None, include_embeddings: bool = False,
              exact: bool = False, routers: bool = True) -> ScanResult:
    """Spectrum SNR of every weight matrix of a live model (same coverage and settings as :func:`scan`).

    Module names are the live model's, without wrapper prefixes (:func:`canonical_name`), so the result
    can be given to :func:`freeze`, :func:`param_groups` or :func:`retarget` directly. Sharded models
    are gathered one matrix at a time. In a process group every rank must call this (the gathers are
    collectives); each computes its share of the matrices and all return the same result. PEFT
    adapters are not merged: the base weights are scanned.
    """
    import time

    t0 = time.perf_counter()
    mats = _live_matrices(model, types, include_embeddings, routers)
    if not mats:
        what = f" of types {', '.join(types)}" if types else ""
        raise SpectrumError(f"{type(model).__name__}: no 2-D weight matrices{what} to scan")
    ctx, _ = _context()
    rank, world = (ctx.rank, ctx.world) if ctx else (0, 1)
    owner_of = lpt([cost(s) for _, _, s in mats], world)
    records: list[MatrixRecord] = []
    error: BaseException | None = None
    for i, (canon, p, shape) in enumerate(mats):
        mine = owner_of[i] == rank and error is None
        if not mine and not (hasattr(p, "ds_id") or _is_dtensor(p)):
            continue  # a whole local copy: nothing to take part in
        with _gathered(p) as full:
            if not mine:
                continue
            try:
                w = _to_numpy(full)
                records.append(_record(canon, shape, str(full.dtype), matrix_stats(w, exact=exact)))
            except Exception as e:  # sent to every rank by exchange(); the gathers must go on
                if ctx is None:
                    raise
                error = e
    if ctx is not None:
        records = exchange(ctx, records, error)
    order = {canon.removesuffix(".weight"): i for i, (canon, _, _) in enumerate(mats)}
    records.sort(key=lambda r: order[r.module])
    names = [canonical_name(n) for n, _ in model.named_parameters()]
    label = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    return ScanResult(
        model=label, slug=_slug(label), records=records,
        settings={"types": list(types) if types else None, "include_embeddings": include_embeddings,
                  "exact": exact, "routers": routers, "live": True, "world_size": world},
        embedding_names=[n for n in names if is_embedding(n)], head_names=[n for n in names if is_head(n)],
        backend="cpu", elapsed_s=round(time.perf_counter() - t0, 3), tool_version=__version__, origin="live")


def _slug(label: str) -> str:
    base = label.rstrip("/").rsplit("/", 1)[-1] if label.startswith(("/", ".")) else label
    return re.sub(r"[/_\\\s]+", "-", base).strip("-") or "live"


def _record(canon: str, shape: tuple[int, int], dtype: str, out) -> MatrixRecord:
    mod = module_name(canon)
    st = out.stats
    if out.status != STATUS_OK:
        warnings.warn(f"live tensor '{canon}' is {out.status}: no SNR, never selected", DegenerateMatrixWarning,
                      stacklevel=4)
    return MatrixRecord(
        module=mod, type=module_type(mod), snr=out.snr, shape=shape,
        dtype=_DTYPE_NAMES.get(dtype.removeprefix("torch."), dtype.removeprefix("torch.")),
        status=out.status, method=out.method, sigma_max=st.sigma_max if st else None,
        tau=st.tau if st else None, n_signal=st.n_signal if st else None,
        noise_free=st.noise_free if st else None)


# -- retargeting ---------------------------------------------------------------------------------------


@dataclass
class RetargetReport:
    """What :func:`retarget` changed. Module names are canonical (wrapper-free)."""

    result: ScanResult
    selected: list[str]
    entered: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    stayed: list[str] = field(default_factory=list)
    freed_states: int = 0
    groups_added: int = 0
    lr: dict[str, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.entered or self.left)

    def __str__(self) -> str:
        return (f"retarget: {len(self.selected)} modules selected, {len(self.entered)} entered, "
                f"{len(self.left)} left, {self.freed_states} optimizer states freed")


def _unwrap(obj: Any, attr: str) -> Any:
    """The torch object inside accelerate's AcceleratedOptimizer / AcceleratedScheduler."""
    inner = getattr(obj, attr, None)
    while inner is not None and type(obj).__module__.startswith("accelerate"):
        obj, inner = inner, getattr(inner, attr, None)
    return obj


def _check_supported(model: torch.nn.Module, optimizer: Any) -> None:
    named = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in named) or type(optimizer).__module__.startswith("deepspeed"):
        raise SpectrumError(ZERO3_UNSUPPORTED)
    for name, _ in named:
        _check_scannable(name)
        if any(x.startswith("lora_") for x in name.split(".")):
            raise SpectrumError("retarget() moves full-weight Spectrum training; this model has LoRA adapters "
                                f"('{name}'), whose targets are fixed when they are created")
    from torch.nn.parallel import DistributedDataParallel

    ctx, _ = _context()
    if isinstance(model, DistributedDataParallel) or (ctx is not None and not any(_is_dtensor(p) for _, p in named)):
        raise SpectrumError("retarget() under data parallelism needs FSDP2 (fully_shard): DDP registers the "
                            "trainable parameters when it wraps the model, so a parameter unfrozen later would "
                            "never be averaged across ranks (retarget, then wrap in a new DDP)")


def retarget(model: torch.nn.Module, optimizer: Any, *, top: float = 0.5, grouping: str = MOE_EXPERT,
             types: Sequence[str] | None = None, scheduler: Any = None, base_lr: float | None = None,
             rescale: bool = True, result: ScanResult | None = None) -> RetargetReport:
    """Rescan the live weights, select the top fraction per type again, and move training there.

    ``requires_grad`` changes on the parameters of scanned modules only (embeddings, head and norms
    keep theirs). ``types``: module types to rescan and reselect; default: the types that have a
    trainable module now (a run training only attention keeps training only attention). ``result``:
    a :func:`scan_live` result to use instead of scanning.

    The optimizer: a stayer's state and group are left exactly as they are; a leaver's state is
    deleted, its ``.grad`` dropped and it is removed from its group (a group left empty stays in
    place, so a scheduler's per-group lists stay aligned, and is reused by the next module that
    enters); an entrant starts with fresh state.

    * Groups built by :func:`param_groups`: an entrant takes a free group of its type, else a new one;
      its ``lr`` is ``base * r`` with the ratio of :func:`lr_ratios` over the new trainable set and
      ``base`` the current base learning rate (``base_lr``, or read back from the groups, so a
      scheduler's progress is kept). With ``rescale`` every stayer's ``lr`` follows its new SNR too.
    * Any other optimizer: an entrant joins the group holding its role (same module type and
      parameter, e.g. ``mlp.down_proj.weight``), so it shares that group's hyperparameters.

    Pass the LR ``scheduler`` when learning rates or groups change: its per-group ``base_lrs`` (and
    ``lr_lambdas``) are brought in line with the groups. Call on every rank under FSDP2.
    """
    try:  # before any work: a bad argument must not cost a scan
        top = validate_top(top)
        group_of("", grouping)
    except ValueError as e:
        raise SpectrumError(str(e)) from None
    opt = _unwrap(optimizer, "optimizer")
    sched = _unwrap(scheduler, "scheduler") if scheduler is not None else None
    _check_supported(model, opt)
    named = [(n, canonical_name(n), p) for n, p in model.named_parameters() if "original_module" not in n.split(".")]
    if types is None:
        current = {module_type(module_name(c)) for _, c, p in named
                   if p.requires_grad and is_scanned_by_default(c, _full_shape(p))}
        types = sorted(current) or None
    res = result if result is not None else scan_live(model, types=types)
    sel = res.select(top, grouping=grouping)
    records = {r.module: r for r in res.records}
    selected = set(sel.modules)
    groups = opt.param_groups
    where = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
    spectrum = any("spectrum" in g for g in groups)
    base, initial = _bases(groups, base_lr) if spectrum else (None, None)  # before anything changes

    # the role of a parameter (module type + parameter name) -> a group that holds one: for entrants
    role_group: dict[tuple[str, str], int] = {}
    entering: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    leaving: list[torch.nn.Parameter] = []
    entered, left, stayed = set(), set(), set()
    for _, canon, p in named:
        mod = owner(canon, records)
        if mod is None:
            continue
        on = mod in selected
        p.requires_grad_(on)
        role = (group_of(records[mod].type, grouping), canon[len(mod) + 1:])
        if id(p) in where:
            role_group.setdefault(role, where[id(p)])
            if on:
                stayed.add(mod)
            else:
                leaving.append(p)
                left.add(mod)
        elif on:
            entering.setdefault(mod, []).append((canon, p))
            entered.add(mod)

    report = RetargetReport(result=res, selected=sel.modules, entered=_ordered(entered, records),
                            left=_ordered(left, records), stayed=_ordered(stayed - entered, records))
    gone = {id(p) for p in leaving}
    for p in leaving:
        if opt.state.pop(p, None) is not None:
            report.freed_states += 1
        p.grad = None
    for g in groups:
        if any(id(p) in gone for p in g["params"]):
            g["params"] = [p for p in g["params"] if id(p) not in gone]
            if "spectrum" in g and not g["params"] and g.get("type") is not None:
                g.update(name="<free>", modules=[], snr=None)

    n_before = len(groups)
    touched: set[int] = set()
    for mod, plist in entering.items():
        rec = records[mod]
        t = group_of(rec.type, grouping)
        for canon, p in plist:
            nd = no_decay(canon)
            if spectrum:
                gi = _spectrum_slot(opt, mod, rec, t, nd, touched)
            else:
                role = (t, canon[len(mod) + 1:])
                gi = role_group.get(role, next((i for (tt, leaf), i in role_group.items() if leaf == role[1]), 0))
            groups[gi]["params"].append(p)
    report.groups_added = len(groups) - n_before
    if spectrum:
        _set_lrs(groups, records, base, initial, touched, rescale)
    if sched is not None:
        _sync_scheduler(sched, groups)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for _, canon, p in named:
        mod = owner(canon, records)
        if mod in selected and mod not in report.lr and id(p) in lr_of:
            report.lr[mod] = lr_of[id(p)]
    return report


def _ordered(mods: set[str], records: dict[str, MatrixRecord]) -> list[str]:
    order = {m: i for i, m in enumerate(records)}
    return sorted(mods, key=lambda m: order[m])


def _bases(groups: list[dict[str, Any]], base_lr: float | None) -> tuple[float, float | None]:
    """The base learning rate now (a scheduler's factor included) and at the start (``initial_lr``)."""
    ref = next((g for g in groups if "lr_ratio" in g and g["lr_ratio"] > 0), None)
    if ref is None:
        raise SpectrumError("the optimizer's spectrum groups carry no lr_ratio; pass base_lr")
    now = base_lr if base_lr is not None else ref["lr"] / ref["lr_ratio"]
    initial = ref["initial_lr"] / ref["lr_ratio"] if "initial_lr" in ref else None
    if base_lr is not None and initial is not None:
        initial = initial * base_lr / (ref["lr"] / ref["lr_ratio"])
    return now, initial


def _spectrum_slot(opt: Any, mod: str, rec: MatrixRecord, t: str, nd: bool, touched: set[int]) -> int:
    """The group an entrant of a param_groups() optimizer goes to: its own, a free one, or a new one."""
    groups = opt.param_groups
    for i, g in enumerate(groups):  # a sibling parameter of the same module already placed
        if i in touched and g.get("modules") == [mod] and g.get("no_decay") == nd:
            return i
    free = [i for i, g in enumerate(groups) if "spectrum" in g and g.get("type") is not None and not g["params"]
            and g.get("no_decay") == nd]
    same_type = [i for i in free if groups[i]["type"] == t]
    if same_type or free:
        i = (same_type or free)[0]
    else:
        template = next((g for g in groups if "spectrum" in g and g.get("no_decay") == nd),
                        next(g for g in groups if "spectrum" in g))
        g = new_group(mod, rec, nd, template["lr"], 1.0, template["weight_decay"], template["spectrum"])
        g.update({k: v for k, v in template.items() if k not in g})  # betas, eps, initial_lr, ...
        g["params"] = []
        opt.add_param_group(g)
        i = len(groups) - 1
    groups[i].update(name=mod + (" (no decay)" if nd else ""), modules=[mod], type=t, snr=rec.snr)
    touched.add(i)
    return i


def _set_lrs(groups: list[dict[str, Any]], records: dict[str, MatrixRecord], base: float, initial: float | None,
             touched: set[int], rescale: bool) -> None:
    """Learning rates of param_groups() groups from the SNRs of the new trainable set."""
    mods = {g["modules"][0]: g for g in groups if "spectrum" in g and g.get("type") is not None and g["params"]}
    settings = next(g["spectrum"] for g in groups if "spectrum" in g)
    snr = {m: (records[m].snr if records[m].selectable else math.nan) if m in records else math.nan for m in mods}
    ratios = lr_ratios(snr, {m: mods[m]["type"] for m in mods}, scale=settings["scale"],
                       min_ratio=settings["min_ratio"], max_ratio=settings["max_ratio"])
    for i, g in enumerate(groups):
        if "spectrum" not in g or not g["params"]:
            continue
        if g.get("type") is None or not (rescale or i in touched):
            continue  # parameters outside the scan keep their learning rate
        r = ratios[g["modules"][0]]
        g["snr"] = snr[g["modules"][0]]
        g["lr_ratio"] = r
        g["lr"] = base * r
        if initial is not None:
            g["initial_lr"] = initial * r


def _sync_scheduler(sched: Any, groups: list[dict[str, Any]]) -> None:
    """Per-group lists of a torch LR scheduler made to match the param groups again."""
    if hasattr(sched, "base_lrs"):
        sched.base_lrs = [g.get("initial_lr", g["lr"]) for g in groups]
    lambdas = getattr(sched, "lr_lambdas", None)
    if isinstance(lambdas, list) and lambdas and len(lambdas) < len(groups):
        lambdas.extend([lambdas[-1]] * (len(groups) - len(lambdas)))
    if hasattr(sched, "_last_lr"):
        sched._last_lr = [g["lr"] for g in groups]


# -- transformers Trainer ---------------------------------------------------------------------------


@functools.cache
def _callback_class() -> type:
    from transformers import TrainerCallback

    class SpectrumRetargetCallback(TrainerCallback):
        """Re-target Spectrum training every N epochs or steps (:func:`spectrum_fast.retarget.retarget`).

        ``SpectrumRetargetCallback(every_n_epochs=1, top=0.5)``; the reports are kept in ``.reports``.
        Not after the last epoch / step (nothing would train on the new selection).
        """

        def __init__(self, every_n_epochs: int | None = None, every_n_steps: int | None = None,
                     top: float = 0.5, *, grouping: str = MOE_EXPERT, types: Sequence[str] | None = None,
                     rescale: bool = True) -> None:
            if (every_n_epochs is None) == (every_n_steps is None):
                raise SpectrumError("SpectrumRetargetCallback needs exactly one of every_n_epochs, every_n_steps")
            for what, n in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
                if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                    raise SpectrumError(f"{what} must be a positive integer, got {n!r}")
            self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
            self.top = validate_top(top)
            self.grouping, self.types, self.rescale = grouping, types, rescale
            self.reports: list[RetargetReport] = []

        def on_epoch_end(self, args, state, control, **kwargs):
            if self.every_n_epochs and round(state.epoch or 0) % self.every_n_epochs == 0:
                self._run(state, kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            if self.every_n_steps and state.global_step % self.every_n_steps == 0:
                self._run(state, kwargs)

        def _run(self, state, kwargs: dict[str, Any]) -> None:
            if state.max_steps and state.global_step >= state.max_steps:
                return
            if kwargs.get("optimizer") is None:
                raise SpectrumError("SpectrumRetargetCallback: the Trainer has no optimizer yet")
            report = retarget(kwargs["model"], kwargs["optimizer"], top=self.top, grouping=self.grouping,
                              types=self.types, scheduler=kwargs.get("lr_scheduler"), rescale=self.rescale)
            self.reports.append(report)
            if state.is_world_process_zero:
                log.info("step %d: %s", state.global_step, report)

    SpectrumRetargetCallback.__module__ = __name__
    SpectrumRetargetCallback.__qualname__ = "SpectrumRetargetCallback"
    return SpectrumRetargetCallback


def __getattr__(name: str) -> Any:
    if name == "SpectrumRetargetCallback":  # built on first use: importing this module needs no transformers
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    SpectrumRetargetCallback: Callable[..., Any]
