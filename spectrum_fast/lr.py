"""Learning rates that grow with SNR: optimizer parameter groups for a model frozen by :func:`freeze`.

Spectrum trains the modules with the highest signal-to-noise ratio; :func:`param_groups` goes one step
further and gives each trainable module a learning rate scaled by where its SNR stands among the
trainable modules of its own type (an ``mlp.down_proj`` is only compared with other ``mlp.down_proj``,
as in the selection). Parameters are matched to scanned modules by name, through the same wrappers as
:func:`~spectrum_fast.apply.freeze` (PEFT, DDP, FSDP1 ``use_orig_params=True``, checkpointing,
``torch.compile``); nothing reads ``param.shape``, so FSDP2 (DTensor) and DeepSpeed ZeRO-3 (shape
``[0]``) parameters work as they are.

The groups are plain dicts for any ``torch.optim`` optimizer (``torch.optim.AdamW(groups)``) or for
``deepspeed.initialize(optimizer=...)``. Besides ``params``, ``lr`` and ``weight_decay`` each carries
keys for inspection that optimizers keep and ignore: ``name``, ``modules``, ``type``, ``snr``,
``lr_ratio``, ``no_decay`` and ``spectrum`` (the settings), which :func:`~spectrum_fast.retarget.retarget`
reads back. An LR scheduler scales every group's ``lr`` by the same factor, so the ratios survive it.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .apply import canonical_name, is_norm, live_aliases
from .errors import SpectrumError
from .naming import MOE_EXPERT, group_of, module_type
from .result import MatrixRecord, ScanResult
from .selection import Selection, group_keys, validate_top

if TYPE_CHECKING:
    import torch

SCALES = ("snr", "rank", "none")
#: Name of the group holding trainable parameters outside the scan (embeddings, head, norms).
OTHER = "other"
_NO_DECAY = " (no decay)"


def snr_source(result: Any) -> ScanResult:
    """The :class:`ScanResult` behind ``result``: itself, a :class:`Selection`'s, a result file, a model
    to scan, or a ``{module: snr}`` mapping. Selections without SNRs (YAML files, name lists) are refused.
    """
    if isinstance(result, ScanResult):
        return result
    if isinstance(result, Selection):
        return result.result
    if isinstance(result, Mapping):
        try:
            records = [MatrixRecord(str(m), module_type(str(m)), float(s)) for m, s in result.items()]
        except (TypeError, ValueError):
            raise SpectrumError("an SNR mapping must map module names to numbers") from None
        return ScanResult(model="<mapping>", slug="mapping", records=records, origin="mapping")
    if isinstance(result, (str, os.PathLike)):
        path = os.fspath(result)
        if path.endswith((".yaml", ".yml")):
            raise SpectrumError(f"{path}: an unfrozen_parameters YAML holds no SNRs; pass the scan result "
                                "(ScanResult or its .json file) to scale learning rates")
        if path.endswith(".json"):
            return ScanResult.load(path)
        from .scanner import scan

        return scan(path, progress=False)
    raise SpectrumError(f"learning rates need SNRs: cannot take them from {type(result).__name__} "
                        "(pass a ScanResult, a result .json file or a model to scan)")


def owner(canon: str, modules: Mapping[str, Any] | set[str]) -> str | None:
    """The longest dotted prefix of a canonical parameter name that is a scanned module, if any.

    Longest, so a LoRA adapter (``...q_proj.lora_A.default.weight``) or a bias belongs to its module.
    """
    parts = canon.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            return prefix
    return None


def no_decay(canon: str) -> bool:
    """Biases and normalisation weights, which weight decay should not pull towards zero."""
    return canon.rsplit(".", 1)[-1] == "bias" or is_norm(canon)


def lr_ratios(snr: Mapping[str, float], group: Mapping[str, str], *, scale: str = "snr",
              min_ratio: float = 0.5, max_ratio: float = 2.0) -> dict[str, float]:
    """The learning-rate multiplier of every module in ``snr``, ranked within its ``group``.

    ``snr`` holds the trainable modules only; NaN ones get 1 and take no part in the ranking.

    * ``"snr"``: ``r = snr / median(snr of the group)``;
    * ``"rank"``: geometric from ``min_ratio`` (lowest SNR) to ``max_ratio`` (highest):
      ``r = min_ratio * (max_ratio / min_ratio) ** (rank / (n - 1))``, ``rank`` 0-based ascending,
      ties sharing their mean rank; a group of one gets 1;
    * ``"none"``: ``r = 1``;

    then clipped to ``[min_ratio, max_ratio]``.
    """
    _check_scale(scale, min_ratio, max_ratio)
    members: dict[str, list[str]] = {}
    for m, s in snr.items():
        if not math.isnan(s):
            members.setdefault(group[m], []).append(m)
    out = {m: 1.0 for m in snr}
    if scale != "none":
        for mods in members.values():
            values = [snr[m] for m in mods]
            out.update(zip(mods, _snr_ratios(values) if scale == "snr"
                           else _rank_ratios(values, min_ratio, max_ratio)))
    return {m: min(max(r, min_ratio), max_ratio) for m, r in out.items()}


def _snr_ratios(values: list[float]) -> list[float]:
    med = statistics.median(values)
    if math.isinf(med):  # mostly noise-free matrices: only "infinite" versus not is left to compare
        return [math.inf if math.isinf(v) else 0.0 for v in values]
    if med <= 0.0:  # a median SNR of 0 (signal below tau): every positive SNR is far above it
        return [math.inf if v > 0 else 1.0 for v in values]
    return [v / med for v in values]


def _rank_ratios(values: list[float], lo: float, hi: float) -> list[float]:
    n = len(values)
    if n == 1:
        return [1.0]
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:  # equal SNRs share their mean rank, so the result does not depend on module names
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return [lo * (hi / lo) ** (r / (n - 1)) for r in ranks]


def _check_scale(scale: str, min_ratio: float, max_ratio: float) -> None:
    if scale not in SCALES:
        raise SpectrumError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if not (0.0 < min_ratio <= max_ratio) or math.isinf(max_ratio):
        raise SpectrumError(f"need 0 < min_ratio <= max_ratio < inf, got min_ratio={min_ratio!r}, "
                            f"max_ratio={max_ratio!r}")


def _trainable(model: torch.nn.Module) -> list[tuple[str, str, torch.nn.Parameter]]:
    """``(name, canonical name, parameter)`` of every trainable parameter, in the model's order."""
    out = []
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "_flat_param":
            raise SpectrumError("this model is wrapped in FSDP1 with use_orig_params=False: its flattened "
                                "parameters cannot get learning rates of their own; wrap with "
                                "use_orig_params=True (or use FSDP2's fully_shard)")
        if p.requires_grad:
            out.append((name, canonical_name(name), p))
    return out


def param_groups(model: torch.nn.Module, result: Any, *, base_lr: float, scale: str = "snr",
                 min_ratio: float = 0.5, max_ratio: float = 2.0, top: float | None = None,
                 grouping: str = MOE_EXPERT, weight_decay: float = 0.0,
                 no_decay_norms_biases: bool = True, stacks: str = "merged") -> list[dict[str, Any]]:
    """Optimizer parameter groups over the trainable parameters, learning rates growing with SNR.

    Per module type (``grouping`` and ``stacks`` as in the selection), over the *trainable* scanned modules of that
    type with an SNR (see :func:`lr_ratios` for ``"rank"`` and ``"none"``)::

        r  = snr / median(snr)            # scale="snr"
        r  = min(max(r, min_ratio), max_ratio)
        lr = base_lr * r

    One group per trainable scanned module (its bias and any PEFT adapter under it share its ``lr``);
    trainable parameters outside the scan (embeddings, head, norms) get ``base_lr`` in a group named
    ``"other"``. ``weight_decay`` applies to every group except, with ``no_decay_norms_biases``, the
    biases and norm weights, which go to groups of their own (``name`` ending in ``" (no decay)"``).

    ``result``: a :class:`ScanResult`, a :class:`Selection`, a result file (ours or the reference's), a
    model to scan or a ``{module: snr}`` mapping. ``top``: when given, the model's trainable scanned
    modules must be exactly ``result.select(top)``, a check that groups and freezing came from the
    same selection. Raises when no trainable parameter belongs to a scanned module (names that
    differ between the result and the live model would otherwise give everything ``base_lr``).
    """
    if not (isinstance(base_lr, (int, float)) and base_lr > 0 and math.isfinite(base_lr)):
        raise SpectrumError(f"base_lr must be a positive number, got {base_lr!r}")
    if weight_decay < 0:
        raise SpectrumError(f"weight_decay must be >= 0, got {weight_decay!r}")
    _check_scale(scale, min_ratio, max_ratio)
    res = snr_source(result)
    records = {r.module: r for r in res.records}
    # modules transformers renamed on load get their checkpoint record under the live name
    keys = group_keys(res.records, grouping, stacks)  # the groups the selection ranks in
    alias = live_aliases(model, records)
    records.update({live: records[file] for live, file in alias.items()})
    params = _trainable(model)
    owners = {canon: owner(canon, records) for _, canon, _ in params}
    trainable_mods = {m for m in owners.values() if m is not None}
    if records and not trainable_mods:
        sample = ", ".join(c for _, c, _ in params[:2]) or "none"
        raise SpectrumError(
            f"no trainable parameter belongs to a module of the scan result '{res.slug}' (trainable: {sample}; "
            f"scanned: {next(iter(records))}, ...): freeze the model with this result first, and check that "
            "its names are the live model's (transformers 5 renames some architectures on load, e.g. ViT; "
            "spectrum_fast.retarget.scan_live(model) scans the live names)")
    if top is not None:
        _check_same_selection(res, {alias.get(m, m) for m in trainable_mods}, validate_top(top), grouping, stacks)
    ratios = lr_ratios({m: _rank_snr(records[m]) for m in trainable_mods},
                       {m: keys[alias.get(m, m)] for m in trainable_mods},
                       scale=scale, min_ratio=min_ratio, max_ratio=max_ratio)
    settings = {"scale": scale, "min_ratio": min_ratio, "max_ratio": max_ratio, "grouping": grouping}
    groups: dict[tuple[str | None, bool], dict[str, Any]] = {}
    for _, canon, p in params:
        mod = owners[canon]
        nd = no_decay_norms_biases and no_decay(canon)
        g = groups.get((mod, nd))
        if g is None:
            g = groups[(mod, nd)] = new_group(mod, records.get(mod) if mod else None, nd, base_lr,
                                              ratios.get(mod, 1.0), 0.0 if nd else weight_decay, settings)
        g["params"].append(p)
        if mod is None:
            outer = canon.rsplit(".", 1)[0]
            if outer not in g["modules"]:
                g["modules"].append(outer)
    return list(groups.values())


def new_group(module: str | None, record: MatrixRecord | None, nd: bool, base_lr: float, ratio: float,
              weight_decay: float, settings: dict[str, Any]) -> dict[str, Any]:
    """One parameter group as :func:`param_groups` builds it (``params`` still empty)."""
    grouping = settings["grouping"]
    return {
        "params": [], "lr": base_lr * ratio, "weight_decay": weight_decay,
        "name": (module or OTHER) + (_NO_DECAY if nd else ""),
        "modules": [module] if module else [],
        "type": group_of(record.type, grouping) if record is not None else None,
        "snr": record.snr if record is not None else None,
        "lr_ratio": ratio, "no_decay": nd, "spectrum": dict(settings),
    }


def _rank_snr(rec: MatrixRecord) -> float:
    return rec.snr if rec.selectable else math.nan


def _check_same_selection(res: ScanResult, trainable: set[str], top: float, grouping: str, stacks: str) -> None:
    want = set(res.select(top, grouping=grouping, stacks=stacks).modules)
    extra, missing = sorted(trainable - want), sorted(want - trainable)
    if extra or missing:
        raise SpectrumError(
            f"the model's trainable modules are not result.select(top={top:g}): "
            + "; ".join(s for s in (_few("trainable but not selected", extra), _few("selected but frozen", missing))
                        if s)
            + " (freeze with the same result and top first)")


def _few(what: str, names: Iterable[str]) -> str:
    names = list(names)
    if not names:
        return ""
    return f"{what}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
