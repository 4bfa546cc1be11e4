"""Module names and module types of weight tensors (SPEC.md §2), for any architecture.

No list of known names: a tensor is "in a block" when one component of its dotted name is a number
(``model.layers.12...``, ``transformer.h.3...``, ``encoder.layer.5...``, ``blocks.7...``); its module type
is everything after that first number, as in the reference tool. Mixture-of-experts tensors carry a
second number (``block_sparse_moe.experts.5.w1``): the reference keeps it in the type, so every expert
index is a type of its own; :func:`pooled_type` replaces it with ``*`` to rank all experts together.
"""

from __future__ import annotations

import fnmatch
import re

MOE_EXPERT = "expert"  # reference behaviour: one type per expert index
MOE_POOLED = "pooled"  # all experts of a projection form one type
MOE_GROUPINGS = (MOE_EXPERT, MOE_POOLED)
#: Multi-stack models (CLIP's text and vision towers, encoder-decoders) share module types across stacks:
#: "merged" ranks them together as the reference does; "separate" ranks each stack's modules on their own.
STACKS_MERGED = "merged"
STACKS_SEPARATE = "separate"
STACKINGS = (STACKS_MERGED, STACKS_SEPARATE)

_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embedding)\.weight$")
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$|^output\.weight$")


def module_name(tensor_name: str) -> str:
    return tensor_name.removesuffix(".weight")


def block_index(module: str) -> int | None:
    """Position of the first numeric component of a dotted name, or None."""
    for i, part in enumerate(module.split(".")):
        if part.isdigit():
            return i
    return None


def module_type(module: str) -> str:
    """Reference module type: the part after the block index, or the whole name outside blocks."""
    parts = module.split(".")
    i = block_index(module)
    return ".".join(parts[i + 1:]) if i is not None and i + 1 < len(parts) else module


def stack_of(module: str) -> str:
    """The stack of blocks a module sits in: the name before its block index (``model.layers``,
    ``text_model.encoder.layers``, ``vision_model.encoder.layers``); ``""`` outside numbered blocks."""
    i = block_index(module)
    return ".".join(module.split(".")[:i]) if i is not None else ""


def pooled_type(mtype: str) -> str:
    """``block_sparse_moe.experts.5.w1`` -> ``block_sparse_moe.experts.*.w1`` (numbers become ``*``)."""
    return ".".join("*" if p.isdigit() else p for p in mtype.split("."))


def group_of(mtype: str, grouping: str) -> str:
    if grouping == MOE_EXPERT:
        return mtype
    if grouping == MOE_POOLED:
        return pooled_type(mtype)
    raise ValueError(f"unknown MoE grouping {grouping!r}; expected one of {', '.join(MOE_GROUPINGS)}")


def is_embedding(tensor_name: str) -> bool:
    return block_index(tensor_name) is None and bool(_EMBED.search(tensor_name)) and "position" not in tensor_name


def is_head(tensor_name: str) -> bool:
    return block_index(tensor_name) is None and bool(_HEAD.search(tensor_name))


def is_scanned_by_default(tensor_name: str, shape: tuple[int, ...]) -> bool:
    """2-D ``*.weight`` inside a numbered block (SPEC.md §2)."""
    return len(shape) == 2 and tensor_name.endswith(".weight") and block_index(tensor_name) is not None


def is_router(tensor_name: str) -> bool:
    """A mixture-of-experts router (``mlp.gate``, ``block_sparse_moe.gate``, ``...router``): [experts, hidden]."""
    return module_name(tensor_name).rsplit(".", 1)[-1] in ("gate", "router")


def wants(tensor_name: str, shape: tuple[int, ...], *, include_embeddings: bool,
          types: list[str] | None, routers: bool = True) -> bool:
    """Whether a scan with these settings covers this tensor."""
    if len(shape) != 2 or not tensor_name.endswith(".weight"):
        return False
    if not routers and is_router(tensor_name):
        return False
    if not is_scanned_by_default(tensor_name, shape):
        # embeddings and head are asked for by name, whatever the type patterns say
        return include_embeddings and (is_embedding(tensor_name) or is_head(tensor_name))
    if types:
        mtype = module_type(module_name(tensor_name))
        return any(fnmatch.fnmatchcase(mtype, pat) or fnmatch.fnmatchcase(pooled_type(mtype), pat)
                   for pat in types)
    return True
