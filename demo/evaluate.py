"""Score sentiment-regression models on the held-out demo sets.

Usage::

    .venv/bin/python demo/evaluate.py .demo/minilm-sentiment-tweets .demo/minilm-sentiment-movies \
        out/merged --eval .demo/eval

Each ``MODEL_DIR`` is loaded with ``AutoModelForSequenceClassification`` and ``AutoTokenizer`` (local
files only, nothing is fetched from a hub); the table shows the Pearson correlation between the model's
single regression output and the human mean rating on each held-out domain (``<eval>/*.jsonl``).

``demo/build_models.py`` imports :func:`predict`, :func:`pearson` and :func:`load_eval_sets` from here, so
the numbers in the model cards and the numbers printed by this script are computed the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Order in which domains are shown; other ``*.jsonl`` files in the eval dir follow alphabetically.
DOMAIN_ORDER = ("tweets", "movies")
MAX_LENGTH = 64
EVAL_BATCH_SIZE = 64
#: Examples scored per domain by default (the first N of each held-out file, which is in seeded random
#: order). Keeps three models under ~20 s on 2 CPU cores; ``--limit 0`` scores the whole held-out set.
DEFAULT_LIMIT = 250


def load_eval_sets(eval_dir: Path, limit: int = DEFAULT_LIMIT) -> dict[str, list[dict[str, Any]]]:
    """Read ``<eval_dir>/<domain>.jsonl`` (``{"text", "label", ...}`` per line), first ``limit`` rows each.

    ``limit <= 0`` reads every row.
    """
    files = sorted(eval_dir.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl eval sets in {eval_dir}")
    sets: dict[str, list[dict[str, Any]]] = {}
    for path in files:
        with path.open(encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        sets[path.stem] = rows[:limit] if limit > 0 else rows
    known = [d for d in DOMAIN_ORDER if d in sets]
    return {d: sets[d] for d in known + sorted(set(sets) - set(known))}


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation of two equally long sequences (NaN if either is constant)."""
    n = len(xs)
    if n != len(ys) or n < 2:
        raise ValueError("pearson needs two sequences of the same length >= 2")
    mx, my = math.fsum(xs) / n, math.fsum(ys) / n
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    syy = math.fsum((y - my) ** 2 for y in ys)
    if sxx == 0.0 or syy == 0.0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def predict(
    model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = EVAL_BATCH_SIZE
) -> list[float]:
    """Return the model's scalar output for each text (batched by length to keep padding small)."""
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    preds = [0.0] * len(texts)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx],
                truncation=True,
                max_length=MAX_LENGTH,
                padding=True,
                return_tensors="pt",
            )
            logits = model(**batch).logits.float().reshape(len(idx), -1)[:, 0]
            for i, value in zip(idx, logits.tolist(), strict=True):
                preds[i] = float(value)
    model.train(was_training)
    return preds


def score_model(model: Any, tokenizer: Any, sets: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Pearson correlation of ``model`` on each eval set."""
    return {
        domain: pearson(
            predict(model, tokenizer, [r["text"] for r in rows]), [float(r["label"]) for r in rows]
        )
        for domain, rows in sets.items()
    }


def _load(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, local_files_only=True, dtype="float32"
    )
    return model, tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, metavar="MODEL_DIR")
    parser.add_argument("--eval", type=Path, default=Path(".demo/eval"), help="dir with <domain>.jsonl")
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"examples per domain, first N of each file (default {DEFAULT_LIMIT}; 0 = all)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON instead of a table")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(args.threads)
    sets = load_eval_sets(args.eval, args.limit)
    results: dict[str, dict[str, float]] = {}
    for model_dir in args.models:
        t0 = time.perf_counter()
        model, tokenizer = _load(model_dir)
        results[str(model_dir)] = score_model(model, tokenizer, sets)
        print(f"scored {model_dir} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    domains = list(sets)
    width = max(len("model"), *(len(name) for name in results))
    header = f"{'model':<{width}}  " + "  ".join(f"{d:>8}" for d in domains) + f"  {'mean':>8}"
    counts = ", ".join(f"{d}: n={len(sets[d])}" for d in domains)
    print(f"Pearson r with the human rating on held-out examples ({counts})")
    print(header)
    print("-" * len(header))
    for name, scores in results.items():
        mean = math.fsum(scores.values()) / len(scores)
        print(f"{name:<{width}}  " + "  ".join(f"{scores[d]:8.4f}" for d in domains) + f"  {mean:8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
