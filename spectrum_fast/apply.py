"""Applying a selection to a live model: ``requires_grad`` on exactly the selected modules (SPEC.md §5).

Call it before wrapping for FSDP1 with ``use_orig_params=False`` (flattened parameters cannot be
frozen one by one; :func:`fsdp_auto_wrap_policy` then gives trainable modules units of their own).
Parameter names are compared after removing what wrappers add: PEFT's ``base_model.model.`` and
``.base_layer``, DDP / DeepSpeed's leading ``module.``, FSDP1's ``_fsdp_wrapped_module.``, activation
checkpointing's ``_checkpoint_wrapped_module.`` and ``torch.compile``'s ``_orig_mod.``. A selection
entry that matches no parameter is an error by default: a typo must never become a silent full
fine-tune (or a silent no-op). Nothing here reads ``param.shape`` to decide anything, because under
DeepSpeed ZeRO-3 live parameters have shape ``[0]``; sizes come from ``ds_numel`` there and from the
global shape of DTensors under FSDP2.

Apply the selection *before* the optimizer is built (and before ``deepspeed.initialize``): an
optimizer keeps the parameter list it was given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SpectrumError
from .naming import block_index, is_embedding, is_head, module_type
from .result import ScanResult
from .selection import Selection, axolotl_pattern

if TYPE_CHECKING:
    import torch

_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "base_layer")


def canonical_name(name: str) -> str:
    """A parameter or module name without the components wrappers insert."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    if "modules_to_save" in parts:  # PEFT's trainable copy: lm_head.modules_to_save.<adapter>.weight
        i = parts.index("modules_to_save")
        parts = parts[:i] + parts[i + 2:]
    while True:
        if parts[:1] == ["module"]:  # DDP, DeepSpeed engine
            parts = parts[1:]
        elif parts[:2] == ["base_model", "model"]:  # PEFT
            parts = parts[2:]
        else:
            return ".".join(parts)


def numel(p: torch.nn.Parameter, fsdp1_sizes: dict[int, int] | None = None) -> int:
    """Number of elements of the full parameter, also when it is sharded (ZeRO-3, FSDP2, FSDP1)."""
    ds = getattr(p, "ds_numel", None)
    if ds is not None:
        return int(ds)
    if fsdp1_sizes and id(p) in fsdp1_sizes:
        return fsdp1_sizes[id(p)]
    return int(p.numel())  # a DTensor reports its global size


def _fsdp1_sizes(model: torch.nn.Module) -> dict[int, int]:
    """Full sizes of FSDP1 ``use_orig_params=True`` parameters, which are views of this rank's shard.

    FSDP1 keeps each unit's original parameters and their unsharded shapes on its FlatParameter.
    """
    import math

    sizes: dict[int, int] = {}
    for m in model.modules():
        flat = getattr(m, "_flat_param", None)
        params, shapes = getattr(flat, "_params", None), getattr(flat, "_shapes", None)
        if params is not None and shapes is not None:
            sizes.update({id(p): math.prod(shape) for p, shape in zip(params, shapes)})
    return sizes


@dataclass
class FreezeReport:
    """What :func:`freeze` did."""

    trainable: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    per_type: dict[str, int] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    input_require_grads: bool = False

    @property
    def fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        return (f"{len(self.trainable)} trainable tensors, {self.trainable_params:,} of {self.total_params:,} "
                f"parameters ({100 * self.fraction:.1f}%)")


@dataclass(frozen=True)
class _Entries:
    modules: tuple[str, ...]  # plain module names: prefix match on whole components
    patterns: tuple[str, ...]  # ^...$ lines of the axolotl file: regular expressions


def read_unfrozen_yaml(path: str | os.PathLike) -> list[str]:
    """The ``unfrozen_parameters`` list of an axolotl / reference YAML file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise SpectrumError(f"{path}: cannot read the unfrozen_parameters YAML ({e})") from None
    entries = data.get("unfrozen_parameters") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise SpectrumError(f"{path}: expected a list of strings under 'unfrozen_parameters'")
    return entries


def _entries(source: Any, top: float, grouping: str, stacks: str = "merged") -> _Entries:
    """Turn any supported ``source`` into module names and ``^...$`` patterns."""
    if isinstance(source, Selection):
        names: list[str] = source.modules
    elif isinstance(source, ScanResult):
        names = source.select(top, grouping=grouping, stacks=stacks).modules
    elif isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.suffix in (".yaml", ".yml") and p.is_file():
            names = read_unfrozen_yaml(p)
        elif p.suffix == ".json" and p.is_file():
            names = ScanResult.load(p).select(top, grouping=grouping, stacks=stacks).modules
        else:  # a model to scan
            from .scanner import scan

            names = scan(os.fspath(source), progress=False).select(top, grouping=grouping, stacks=stacks).modules
    elif isinstance(source, Iterable):
        names = list(source)
        if not all(isinstance(n, str) for n in names):
            raise SpectrumError("a selection given as a list must hold module names (strings)")
    else:
        raise SpectrumError(f"cannot take a selection from {type(source).__name__}")
    # ``^...$`` lines, and entries written as axolotl patterns (``model.layers.1.mlp.*``), are regular
    # expressions; everything else is a module (or parameter) name matched component-wise
    is_pattern = [n.startswith("^") or any(c in n for c in "*+?[](){}|\\") for n in names]
    modules = tuple(n for n, pat in zip(names, is_pattern) if not pat)
    patterns = tuple(n for n, pat in zip(names, is_pattern) if pat)
    return _Entries(modules, patterns)


def is_norm(param: str) -> bool:
    """``...input_layernorm.weight``, ``model.norm.weight``, ``...LayerNorm.bias``, GPT-2 ``ln_f.weight``."""
    owner = param.rsplit(".", 2)[-2].lower() if param.count(".") else ""
    return "norm" in owner or owner == "ln" or owner.startswith("ln_")


def live_aliases(model: torch.nn.Module, modules: Iterable[str]) -> dict[str, str]:
    """``{live module name: checkpoint module name}`` for modules that ``transformers`` renames on load.

    transformers 5 loads some architectures under new names (ViT's ``encoder.layer.0.attention.attention.query``
    becomes ``layers.0.attention.q_proj``) and writes the old ones back on save, so a scan of the files
    names modules the live model does not have. Translated with transformers' own conversion mapping;
    modules it merges into other tensors (fused experts) get no alias. Empty when nothing is renamed.
    """
    live: set[str] = set()
    for name, _ in model.named_parameters():
        parts = canonical_name(name).split(".")
        live.update(".".join(parts[:i]) for i in range(1, len(parts)))
    missing = [m for m in modules if m not in live]
    if not missing:
        return {}
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # no transformers, or one that does not rename
        return {}
    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is None:
        return {}
    try:
        mapping = get_model_conversion_mapping(hf)
        renames = [c for c in mapping if isinstance(c, WeightRenaming)]
        converters = [c for c in mapping if isinstance(c, WeightConverter)]
        out = {}
        for m in missing:
            new, converter = rename_source_key(m + ".weight", renames, converters)
            new = new.removesuffix(".weight")
            if converter is None and new != m and new in live:
                out[new] = m
        return out
    except Exception:  # noqa: BLE001 - internal transformers API: without it, names are reported unmatched
        return {}


def freeze(model: torch.nn.Module, source: Any, *, top: float = 0.5, grouping: str = "expert",
           train_embeddings: bool = False, train_lm_head: bool = False, train_norms: bool = False,
           strict: bool = True, stacks: str = "merged") -> FreezeReport:
    """Set ``requires_grad`` per SPEC.md §5 and report what is trainable.

    ``source``: a :class:`ScanResult` or :class:`Selection`, a result file (ours or the reference's,
    flat or grouped), an axolotl ``unfrozen_parameters`` YAML, a model path / repo id to scan, or a
    list of module names (``^...$`` entries are regular expressions over full parameter names, as in
    the YAML). ``top``, ``grouping`` and ``stacks`` apply where a selection must still be made (see
    :func:`~spectrum_fast.selection.select`; ``stacks="separate"`` ranks CLIP's towers apart). With ``strict``
    an entry that matches no parameter raises, naming it.

    When embeddings stay frozen and gradient checkpointing is on, a ``transformers`` model gets
    ``enable_input_require_grads()``, without which backward fails with "element 0 of tensors does
    not require grad".
    """
    entries = _entries(source, top, grouping, stacks)
    # as axolotl applies them: re.match(entry with every "." escaped, parameter name)
    compiled = [(pat, axolotl_pattern(pat)) for pat in entries.patterns]
    alias = live_aliases(model, entries.modules)  # live name -> the checkpoint's, where transformers renames
    wanted = set(entries.modules) | set(alias)
    hits: set[str] = set()
    report = FreezeReport()
    embed_trainable = False
    fsdp1 = _fsdp1_sizes(model)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "_flat_param":
            raise SpectrumError("this model is wrapped in FSDP1 with use_orig_params=False, whose flattened "
                                "parameters cannot be frozen one by one: call freeze() before wrapping, and wrap "
                                "with auto_wrap_policy=spectrum_fast.fsdp_auto_wrap_policy(model)")
        canon = canonical_name(name)
        if "original_module" in name.split("."):
            p.requires_grad_(False)  # PEFT's frozen original beside a modules_to_save copy: not counted twice
            continue
        parts = canon.split(".")
        on = False
        # an entry names the parameter or a module containing it: any dotted prefix, nested ones too
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in wanted:
                hits.add(alias.get(prefix, prefix))
                on = True
        for pat, rx in compiled:
            if rx.match(canon):
                hits.add(pat)
                on = True
        if (train_embeddings and is_embedding(canon)) or (train_lm_head and is_head(canon)):
            on = True
        if train_norms and is_norm(canon):
            on = True
        p.requires_grad_(on)
        n = numel(p, fsdp1)
        report.total_params += n
        if on:
            report.trainable.append(name)
            report.trainable_params += n
            mod = canon.rsplit(".", 1)[0]
            key = module_type(mod) if block_index(mod) is not None else mod
            report.per_type[key] = report.per_type.get(key, 0) + n
            embed_trainable |= is_embedding(canon)
    report.unmatched = sorted((set(entries.modules) | set(entries.patterns)) - hits)
    if report.unmatched and strict:
        shown = ", ".join(report.unmatched[:3]) + (f" and {len(report.unmatched) - 3} more"
                                                   if len(report.unmatched) > 3 else "")
        hint = _fused_experts_hint(model, report.unmatched)
        raise SpectrumError(f"{len(report.unmatched)} selection entries match no parameter of the model: "
                            f"{shown}{hint}")
    if not embed_trainable and _checkpointing(model):
        enable = getattr(model, "enable_input_require_grads", None)
        if enable is not None:
            enable()
            report.input_require_grads = True
    return report


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether a transformers model has gradient checkpointing on (transformers 5 renamed the flag and
    deprecated the old one, which warns when read)."""
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), flag) or flag in vars(model):
            return bool(getattr(model, flag))
    return False


def _fused_experts_hint(model: torch.nn.Module, unmatched: Sequence[str]) -> str:
    """Explain the one common cause of unmatched expert entries: experts fused into 3-D parameters."""
    if not any(re.search(r"\.experts\.\d+\.", u) for u in unmatched):
        return ""
    fused = [n for n, p in model.named_parameters()
             if ".experts." in n and len(getattr(p, "ds_shape", p.shape)) == 3]
    if not fused:
        return ""
    return (f" (this model stores its experts fused in 3-D parameters such as '{fused[0]}', so a per-expert "
            "selection cannot be applied with requires_grad; leave the experts out of the selection, "
            "e.g. scan with types=['self_attn.*'], or pass strict=False to skip these entries)")


def lora_target_modules(source: Any, *, top: float = 0.5, grouping: str = "expert") -> list[str]:
    """Module names for ``peft.LoraConfig(target_modules=...)``: LoRA on the selected modules only.

    PEFT matches a list of names against the end of each module's full name, so full module names
    address exactly one module each.
    """
    return list(_entries(source, top, grouping).modules)


def fsdp_auto_wrap_policy(model: torch.nn.Module):
    """An FSDP1 ``auto_wrap_policy`` giving every trainable module its own FSDP unit.

    FSDP1 with ``use_orig_params=False`` flattens each unit's parameters into one tensor and needs them
    all trainable or all frozen. Call :func:`freeze` first, then wrap with this policy: every module
    that directly owns a trainable parameter becomes a unit of its own, everything else stays frozen.
    """
    import functools

    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    own = {id(m) for m in model.modules()
           if any(p.requires_grad for p in m.parameters(recurse=False))}
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in own)
