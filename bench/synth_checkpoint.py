"""Synthetic checkpoints with the exact tensor names, shapes and dtypes of real models, from their config.

    python bench/synth_checkpoint.py bench/configs/Qwen1.5-110B.json /tmp/qwen110b --layers 2
    python bench/synth_checkpoint.py bench/configs/DeepSeek-V3.json /tmp/dsv3 --layers auto

``tensor_list(config)`` is the whole model's tensor table as its Hub checkpoint stores it (Llama / Mistral /
Qwen2 dense, Mixtral MoE, DeepSeek-V3 MLA + MoE in FP8 with 128x128 ``weight_scale_inv`` blocks, its MTP
layer included). ``write()`` writes the first N decoder layers of it as sharded safetensors with an index
and a config.json, so a scan of the directory sees what it would see in the real model's first N layers.

Weights are not zeros and not plain noise: each matrix is ``0.02 * G + U diag(s) V^T`` with a rank-24
signal whose singular values lie above the Marchenko-Pastur edge of the noise (by a factor drawn per
matrix), so the spectra have a bulk plus outliers as trained weights do and SNRs differ from matrix to
matrix. Generation streams row blocks: memory stays at a few hundred MB whatever the matrix size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}
_NOISE = 0.02
_RANK = 24
_BLOCK_ROWS = 2048


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    layer: int | None  # decoder layer index, None outside the layers

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _BYTES[self.dtype]


def _dense_attn(c: dict, p: str, layer: int, bias: bool) -> Iterator[Spec]:
    h, nh = c["hidden_size"], c["num_attention_heads"]
    hd = c.get("head_dim") or h // nh
    kv = c.get("num_key_value_heads", nh)
    for proj, rows in (("q_proj", nh * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
        yield Spec(f"{p}self_attn.{proj}.weight", (rows, h), "BF16", layer)
        if bias:
            yield Spec(f"{p}self_attn.{proj}.bias", (rows,), "BF16", layer)
    yield Spec(f"{p}self_attn.o_proj.weight", (h, nh * hd), "BF16", layer)


def _mlp(p: str, h: int, i: int, layer: int, dtype: str = "BF16", names=("gate_proj", "up_proj", "down_proj")
         ) -> Iterator[Spec]:
    gate, up, down = names
    yield Spec(f"{p}{gate}.weight", (i, h), dtype, layer)
    yield Spec(f"{p}{up}.weight", (i, h), dtype, layer)
    yield Spec(f"{p}{down}.weight", (h, i), dtype, layer)


def _norms(p: str, h: int, layer: int) -> Iterator[Spec]:
    yield Spec(f"{p}input_layernorm.weight", (h,), "BF16", layer)
    yield Spec(f"{p}post_attention_layernorm.weight", (h,), "BF16", layer)


def _fp8(specs: Iterator[Spec], block: int) -> Iterator[Spec]:
    """DeepSeek-V3 layout: each 2-D weight in FP8 E4M3 plus its float32 per-block ``weight_scale_inv``."""
    for s in specs:
        if len(s.shape) == 2:
            yield Spec(s.name, s.shape, "F8_E4M3", s.layer)
            grid = (math.ceil(s.shape[0] / block), math.ceil(s.shape[1] / block))
            yield Spec(s.name + "_scale_inv", grid, "F32", s.layer)
        else:
            yield s


def _deepseek_layer(c: dict, p: str, layer: int) -> Iterator[Spec]:
    h, nh = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    block = (c.get("quantization_config") or {}).get("weight_block_size", [128, 128])[0]
    fp8 = (c.get("quantization_config") or {}).get("quant_method") == "fp8"

    def q(specs: Iterator[Spec]) -> Iterator[Spec]:
        return _fp8(specs, block) if fp8 else specs

    attn = [Spec(f"{p}self_attn.q_a_proj.weight", (c["q_lora_rank"], h), "BF16", layer),
            Spec(f"{p}self_attn.q_b_proj.weight", (nh * qk, c["q_lora_rank"]), "BF16", layer),
            Spec(f"{p}self_attn.kv_a_proj_with_mqa.weight", (c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
                 "BF16", layer),
            Spec(f"{p}self_attn.kv_b_proj.weight",
                 (nh * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]), "BF16", layer),
            Spec(f"{p}self_attn.o_proj.weight", (h, nh * c["v_head_dim"]), "BF16", layer)]
    yield from q(iter(attn))
    yield Spec(f"{p}self_attn.q_a_layernorm.weight", (c["q_lora_rank"],), "BF16", layer)
    yield Spec(f"{p}self_attn.kv_a_layernorm.weight", (c["kv_lora_rank"],), "BF16", layer)
    if layer < c["first_k_dense_replace"]:
        yield from q(_mlp(f"{p}mlp.", h, c["intermediate_size"], layer))
    else:
        yield Spec(f"{p}mlp.gate.weight", (c["n_routed_experts"], h), "BF16", layer)
        yield Spec(f"{p}mlp.gate.e_score_correction_bias", (c["n_routed_experts"],), "F32", layer)
        for e in range(c["n_routed_experts"]):
            yield from q(_mlp(f"{p}mlp.experts.{e}.", h, c["moe_intermediate_size"], layer))
        yield from q(_mlp(f"{p}mlp.shared_experts.", h, c["moe_intermediate_size"] * c["n_shared_experts"], layer))
    yield from _norms(p, h, layer)


def tensor_list(c: dict) -> list[Spec]:
    """Every tensor of the model described by config ``c``, named as in its Hub checkpoint."""
    mt = c["model_type"]
    h, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    out = [Spec("model.embed_tokens.weight", (V, h), "BF16", None)]
    for layer in range(L):
        p = f"model.layers.{layer}."
        if mt in ("llama", "mistral", "qwen2"):
            out += _dense_attn(c, p, layer, bias=mt == "qwen2")
            out += _mlp(f"{p}mlp.", h, c["intermediate_size"], layer)
            out += _norms(p, h, layer)
        elif mt == "mixtral":
            out += _dense_attn(c, p, layer, bias=False)
            out.append(Spec(f"{p}block_sparse_moe.gate.weight", (c["num_local_experts"], h), "BF16", layer))
            for e in range(c["num_local_experts"]):
                out += _mlp(f"{p}block_sparse_moe.experts.{e}.", h, c["intermediate_size"], layer,
                            names=("w1", "w3", "w2"))
            out += _norms(p, h, layer)
        elif mt == "deepseek_v3":
            out += _deepseek_layer(c, p, layer)
        else:
            raise SystemExit(f"model_type {mt!r} is not one of llama, mistral, qwen2, mixtral, deepseek_v3")
    if mt == "deepseek_v3":  # multi-token-prediction layers follow the decoder layers, as stored on the Hub
        for layer in range(L, L + c.get("num_nextn_predict_layers", 0)):
            p = f"model.layers.{layer}."
            out.append(Spec(f"{p}embed_tokens.weight", (V, h), "BF16", layer))
            out += [Spec(f"{p}enorm.weight", (h,), "BF16", layer), Spec(f"{p}hnorm.weight", (h,), "BF16", layer)]
            out.append(Spec(f"{p}eh_proj.weight", (h, 2 * h), "BF16", layer))
            out += _deepseek_layer(c, p, layer)
            out += [Spec(f"{p}shared_head.norm.weight", (h,), "BF16", layer),
                    Spec(f"{p}shared_head.head.weight", (V, h), "BF16", layer)]
    out.append(Spec("model.norm.weight", (h,), "BF16", None))
    if not c.get("tie_word_embeddings", False):
        out.append(Spec("lm_head.weight", (V, h), "BF16", None))
    return out


def model_bytes(specs: list[Spec]) -> int:
    return sum(s.nbytes for s in specs)


# -- writing -------------------------------------------------------------------------------------------


def _matrix_rows(spec: Spec, seed: int) -> Iterator[tuple[object, object]]:
    """Row blocks of a realistic weight (float32 torch tensors) and, for FP8, the block scales."""
    import torch

    m, n = spec.shape
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    edge = _NOISE * (math.sqrt(m) + math.sqrt(n))
    r = min(_RANK, k)
    strength = 1.0 + 4.0 * float(torch.rand((), generator=g))  # how far above the noise edge, per matrix
    s = edge * strength * (torch.arange(r, 0, -1, dtype=torch.float32) / r) ** 1.5 + edge * 0.5
    u = torch.randn(m, r, generator=g) / math.sqrt(m)
    vt = (torch.randn(r, n, generator=g) / math.sqrt(n)) * s[:, None]
    for r0 in range(0, m, _BLOCK_ROWS):
        r1 = min(m, r0 + _BLOCK_ROWS)
        yield torch.randn(r1 - r0, n, generator=g) * _NOISE + u[r0:r1] @ vt


def _encode(block, dtype: str, scale_block: int) -> tuple[bytes, bytes | None]:
    import torch

    if dtype == "BF16":
        return block.to(torch.bfloat16).view(torch.int16).numpy().tobytes(), None
    if dtype == "F32":
        return block.numpy().tobytes(), None
    if dtype == "F8_E4M3":  # per 128x128 block: scale = amax / 448, stored as scale_inv (multiplied back)
        rows, cols = block.shape
        gr, gc = math.ceil(rows / scale_block), math.ceil(cols / scale_block)
        pad = torch.zeros(gr * scale_block, gc * scale_block)
        pad[:rows, :cols] = block
        tiles = pad.view(gr, scale_block, gc, scale_block)
        amax = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-12)
        scale = amax / 448.0
        q = (tiles / scale[:, None, :, None]).view(gr * scale_block, gc * scale_block)[:rows, :cols]
        return q.to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes(), scale.numpy().tobytes()
    raise ValueError(dtype)


def _vector(spec: Spec) -> bytes:
    import torch

    t = torch.ones(spec.shape) if spec.name.endswith("norm.weight") else torch.zeros(spec.shape)
    return _encode(t.reshape(1, -1), spec.dtype, 128)[0]


def _shards(specs: list[Spec], shard_bytes: int) -> list[list[Spec]]:
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes and not s.name.endswith("_scale_inv"):
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write(config: dict, out: Path, layers: int, *, shard_bytes: int = 5 * 2**30, embeddings: bool = False,
          progress: bool = True, specs: list[Spec] | None = None) -> list[Spec]:
    """Write the first ``layers`` decoder layers (plus embeddings / head if asked) of ``config``'s model, or
    just the tensors ``specs`` if given."""
    if specs is None:
        specs = [s for s in tensor_list(config) if (s.layer is not None and s.layer < layers)
                 or (s.layer is None and (embeddings or len(s.shape) == 1))]
    block = (config.get("quantization_config") or {}).get("weight_block_size", [128, 128])[0]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = _shards(specs, shard_bytes)
    weight_map = {}
    done = shown = 0
    total = sum(s.nbytes for s in specs)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for s in shard:
            header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
            weight_map[s.name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        scales: dict[str, bytearray] = {}
        with open(tmp / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for s in shard:
                if s.name.endswith("_scale_inv") and len(s.shape) == 2:
                    f.write(bytes(scales.pop(s.name[: -len("_scale_inv")])))
                elif len(s.shape) == 2:
                    seed = zlib.crc32(s.name.encode())
                    for rows in _matrix_rows(s, seed):
                        data, sc = _encode(rows, s.dtype, block)
                        f.write(data)
                        if sc is not None:
                            scales.setdefault(s.name, bytearray()).extend(sc)
                else:
                    f.write(_vector(s))
                done += s.nbytes
                if progress and (done - shown >= 2**30 or done == total):
                    shown = done
                    print(f"\rwriting {out.name}: {done / 2**30:6.1f} / {total / 2**30:.1f} GiB", end="",
                          file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    cfg = dict(config, num_hidden_layers=layers, _synthetic_of=config.get("_name_or_path"))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return specs


def layers_that_fit(config: dict, free_bytes: int, fraction: float = 0.5) -> int:
    """Most decoder layers whose weights take at most ``fraction`` of ``free_bytes`` (at least 1)."""
    per_layer = [0] * (config["num_hidden_layers"])
    for s in tensor_list(config):
        if s.layer is not None and s.layer < len(per_layer):
            per_layer[s.layer] += s.nbytes
    used, n = 0, 0
    for b in per_layer:
        if used + b > free_bytes * fraction:
            break
        used, n = used + b, n + 1
    return max(1, n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path, help="a config.json (see bench/configs/)")
    ap.add_argument("out", type=Path, help="output directory (replaced atomically)")
    ap.add_argument("--layers", default="2", help="decoder layers to write, or 'auto' (half the free disk)")
    ap.add_argument("--embeddings", action="store_true", help="also write embeddings and lm_head")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    args = ap.parse_args(argv)
    config = json.loads(args.config.read_text())
    if args.layers == "auto":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        layers = layers_that_fit(config, shutil.disk_usage(args.out.parent).free)
    else:
        layers = int(args.layers)
    specs = write(config, args.out, layers, shard_bytes=int(args.shard_gb * 2**30), embeddings=args.embeddings)
    full = tensor_list(config)
    print(f"{args.out}: {layers} of {config['num_hidden_layers']} layers, {len(specs)} tensors, "
          f"{model_bytes(specs) / 2**30:.1f} GiB (the whole model: {len(full)} tensors, "
          f"{model_bytes(full) / 2**30:.0f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
