"""Which modules to train (SPEC.md §3), and the axolotl YAML that says so (SPEC.md §4)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .atomic import ensure_writable_dir, write_text_atomic
from .errors import SpectrumError
from .naming import MOE_EXPERT, STACKINGS, STACKS_MERGED, STACKS_SEPARATE, group_of, stack_of
from .result import MatrixRecord, ScanResult

# What the reference tool writes when it does not know the checkpoint's names.
REFERENCE_HEAD_LINES = ("^lm_head.weight$", "^model.embed_tokens.weight$")


_PLAIN = re.compile(r"^[A-Za-z0-9_^][A-Za-z0-9_.\-^$]*$")


def _yaml_scalar(text: str) -> str:
    """Plain as the reference writes it where that is safe YAML, double-quoted (JSON) otherwise."""
    return text if _PLAIN.match(text) else json.dumps(text)


def axolotl_pattern(entry: str) -> re.Pattern[str]:
    """An ``unfrozen_parameters`` entry as axolotl applies it: every ``.`` escaped, then ``re.match``."""
    return re.compile(entry.replace(".", "\\."))


def validate_top(top: float) -> float:
    """``top`` must be a fraction in (0, 1]."""
    try:
        value = float(top)
    except (TypeError, ValueError):
        raise ValueError(f"top must be a fraction in (0, 1], got {top!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        hint = f" (did you mean {value / 100:g}?)" if 1.0 < value <= 100.0 else ""
        raise ValueError(f"top must be a fraction in (0, 1], got {top!r}{hint}")
    return value


def percent_label(top: float) -> str:
    """``0.5`` -> ``50``, ``0.125`` -> ``12.5`` (the ``<P>`` of the YAML file name)."""
    return f"{round(top * 100, 6):g}"


@dataclass
class Selection:
    """The chosen modules per group (module type), in SNR order, with the group sizes."""

    result: ScanResult
    top: float
    grouping: str
    groups: dict[str, list[MatrixRecord]]
    group_sizes: dict[str, int]
    stacks: str = STACKS_MERGED

    @property
    def modules(self) -> list[str]:
        return [r.module for recs in self.groups.values() for r in recs]

    def __contains__(self, module: str) -> bool:
        return any(r.module == module for recs in self.groups.values() for r in recs)

    def __len__(self) -> int:
        return sum(len(v) for v in self.groups.values())

    def head_lines(self) -> list[str]:
        """``^name$`` lines for the embeddings and head present in the checkpoint (reference's if unknown)."""
        res = self.result
        if res.embedding_names is None and res.head_names is None:
            return list(REFERENCE_HEAD_LINES)
        return [f"^{n}$" for n in (res.head_names or []) + (res.embedding_names or [])]

    def to_yaml(self, *, embed_head: bool = True) -> str:
        lines = ["unfrozen_parameters:"]
        if embed_head:
            lines += [f"- {_yaml_scalar(h)}" for h in self.head_lines()]
        for group, recs in self.groups.items():
            lines.append(f"# {' '.join(group.split())} layers")
            lines += [f"- {_yaml_scalar(r.module)}" for r in recs]
        return "\n".join(lines) + "\n"

    def yaml_file_name(self) -> str:
        return f"snr_results_{self.result.slug}_unfrozenparameters_{percent_label(self.top)}percent.yaml"

    def save_yaml(self, out_dir: str | os.PathLike, *, embed_head: bool = True) -> Path:
        d = ensure_writable_dir(out_dir)
        return write_text_atomic(d / self.yaml_file_name(), self.to_yaml(embed_head=embed_head))


def group_keys(records: Iterable[MatrixRecord], grouping: str = MOE_EXPERT,
               stacks: str = STACKS_MERGED) -> dict[str, str]:
    """The group every module is ranked in: its type (MoE experts per ``grouping``), and with
    ``stacks="separate"`` its stack too (``text_model.encoder.layers:self_attn.q_proj``), when the model
    has more than one stack; a single-stack model gets the same groups either way."""
    if stacks not in STACKINGS:
        raise SpectrumError(f"stacks must be one of {', '.join(STACKINGS)}, got {stacks!r}")
    records = list(records)
    split = stacks == STACKS_SEPARATE and len({stack_of(r.module) for r in records}) > 1
    return {r.module: (f"{stack_of(r.module)}:" if split else "") + group_of(r.type, grouping) for r in records}


def select(result: ScanResult, top: float = 0.5, *, grouping: str = MOE_EXPERT,
           stacks: str = STACKS_MERGED) -> Selection:
    """Per group: sort by SNR descending (ties by module name), keep the first ``floor(len * top)``.

    ``len`` counts every module of the group, NaN ones included (as the reference does); NaN or
    degenerate modules are never kept, so such a group can yield fewer. Groups are module types
    (:func:`group_keys`: MoE experts per ``grouping``, stacks merged or separate).
    """
    top = validate_top(top)
    keys = group_keys(result.records, grouping, stacks)
    members: dict[str, list[MatrixRecord]] = {}
    for r in result.records:
        members.setdefault(keys[r.module], []).append(r)
    groups: dict[str, list[MatrixRecord]] = {}
    sizes: dict[str, int] = {}
    for group in sorted(members):
        recs = members[group]
        n_keep = math.floor(len(recs) * top + 1e-9)
        ranked = sorted((r for r in recs if r.selectable), key=lambda r: (-r.snr, r.module))
        groups[group] = ranked[:n_keep]
        sizes[group] = len(recs)
    return Selection(result, top, grouping, groups, sizes, stacks)
