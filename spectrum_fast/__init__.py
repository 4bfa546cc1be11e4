"""spectrum_fast: Spectrum (Hartford et al., 2024) signal-to-noise scans of model weights, fast.

    >>> import spectrum_fast
    >>> result = spectrum_fast.scan("mistralai/Mistral-7B-v0.1")   # streamed, one tensor at a time
    >>> result.select(top=0.5).modules                              # top half of each module type
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

# The CLI packages `spectrum_fast.scan` / `spectrum_fast.freeze` (run with `python -m`) share their
# names with the API functions. Import them first so that the function names below win, and a later
# `python -m spectrum_fast.scan` finds the package already imported instead of rebinding the name.
from . import freeze as _freeze_cli  # noqa: F401
from . import scan as _scan_cli  # noqa: F401
from .apply import FreezeReport, freeze, fsdp_auto_wrap_policy, lora_target_modules
from .errors import CheckpointError, ResultFileError, SpectrumError
from .lr import param_groups
from .memory import MemoryBudgetWarning
from .result import MatrixRecord, ScanResult
from .retarget import RetargetReport, retarget, scan_live
from .scanner import DegenerateMatrixWarning, scan
from .selection import Selection, select

load_result = ScanResult.load


def __getattr__(name: str) -> Any:
    # a transformers.TrainerCallback subclass: built on first use, so importing spectrum_fast never
    # imports transformers
    if name == "SpectrumRetargetCallback":
        from .retarget import SpectrumRetargetCallback

        return SpectrumRetargetCallback
    raise AttributeError(f"module 'spectrum_fast' has no attribute {name!r}")

__all__ = [
    "CheckpointError",
    "DegenerateMatrixWarning",
    "FreezeReport",
    "MatrixRecord",
    "MemoryBudgetWarning",
    "ResultFileError",
    "RetargetReport",
    "ScanResult",
    "Selection",
    "SpectrumError",
    "SpectrumRetargetCallback",
    "__version__",
    "freeze",
    "fsdp_auto_wrap_policy",
    "load_result",
    "lora_target_modules",
    "param_groups",
    "retarget",
    "scan",
    "scan_live",
    "select",
]
