"""Bits and nats per character over every character of a split of a run's corpus.

    python -m chatgot_jax.evaluate RUN_DIR [--step N | --best] [--data PATH]
        [--split val|train] [--context N] [--json FILE]       (or: chatgot-evaluate ...)

Every character of the split after its first is predicted exactly once, with
the history chatgot_jax.evaluation gives it: sliding windows of `context`
characters (default the model's max_seq_length); the first window predicts all
its positions, each later one only its last context // 2, so that every
prediction after the first window has at least context - context // 2 + 1
characters of history. The split is the run's own: the corpus it trained on
(checked against its SHA-256) cut at train.val_fraction, unless --data names
another text (then cut the same way).

The standard error accounts for the correlation between neighbouring
characters' losses by batching: the per-character losses are cut into
contiguous blocks (BLOCKS of them, fewer for a short split so that a block
holds at least 4 windows' worth of characters), and SE = sd(block means) /
sqrt(number of blocks). The evaluation is appended to RUN_DIR/evaluations.jsonl,
where the sweep's and compare's full-split figures are looked up first.
"""

import json
import math
import pathlib
import time

from chatgot_jax import cli
from chatgot_jax.errors import InvalidArgument, UserError

BLOCKS = 100
SPLITS = ("val", "train")
EVALUATIONS = "evaluations.jsonl"


def block_standard_error(nll, context: int) -> tuple[float, int]:
    """(standard error of the mean of nll, number of blocks), by contiguous blocks."""
    import numpy as np  # noqa: PLC0415

    nll = np.asarray(nll, np.float64)
    blocks = max(2, min(BLOCKS, len(nll) // (4 * context)))
    means = [b.mean() for b in np.array_split(nll, blocks)]
    return float(np.std(means, ddof=1) / math.sqrt(blocks)), blocks


def split_text(text: str, tokenizer, val_fraction: float, split: str):
    """The split's tokens, cut as training cut them."""
    from chatgot_jax import data as data_lib  # noqa: PLC0415

    train, val = data_lib.split_tokens(tokenizer.encode(text), val_fraction, min_len=2)
    return val if split == "val" else train


def evaluate_tokens(params, model_cfg, tokens, context: int | None = None,
                    batch_size: int = 64) -> dict:
    """{"nats_per_char", "bits_per_char", "se_nats", "se_bits", "chars", "blocks",
    "context", "wall_time_s"} over tokens (every one after the first predicted once)."""
    from chatgot_jax.evaluation import char_nll  # noqa: PLC0415

    context = model_cfg.max_seq_length if context is None else context
    if not 2 <= context <= model_cfg.max_seq_length:
        raise InvalidArgument("context", f"must be between 2 and the model's "
                                         f"max_seq_length {model_cfg.max_seq_length}, "
                                         f"got {context}")
    if len(tokens) < 2:
        raise UserError(f"the split has {len(tokens)} characters: nothing to predict")
    t0 = time.perf_counter()
    nll = char_nll(params, model_cfg, tokens, batch_size=batch_size, context=context)
    se, blocks = block_standard_error(nll, context)
    mean, ln2 = float(nll.mean()), math.log(2)
    return {"nats_per_char": mean, "bits_per_char": mean / ln2, "se_nats": se,
            "se_bits": se / ln2, "chars": int(len(nll)), "blocks": blocks,
            "context": context, "wall_time_s": time.perf_counter() - t0}


def corpus_of(meta_data: dict | None, data_path, run_dir) -> tuple[str, dict]:
    """(text, identity) of the run's own corpus, checked against its hash, or of data_path."""
    from chatgot_jax import data as data_lib  # noqa: PLC0415

    if data_path is None:
        if not meta_data:
            raise UserError(f"{run_dir} records no corpus (a converted or older run): give "
                            f"--data PATH")
        source = meta_data["source"]
        path = None if source.startswith("built-in") else source
        text = data_lib.load_corpus(path)
        identity = data_lib.corpus_identity(path, text)
        if identity["sha256"] != meta_data["sha256"]:
            raise UserError(f"the run's corpus {source} has changed since it trained (sha256 "
                            f"{meta_data['sha256'][:12]}, now {identity['sha256'][:12]}): "
                            f"give --data PATH to evaluate on another text")
        return text, identity
    text = data_lib.load_corpus(data_path)
    return text, data_lib.corpus_identity(data_path, text)


def evaluate_run(run_dir, step: int | None = None, best: bool = False, data=None,
                 split: str = "val", context: int | None = None, cache: bool = True) -> dict:
    """The full-split evaluation of one checkpoint of a run (the newest, step, or the best)
    -> the evaluate_tokens dict plus "run_dir", "step", "split" and "data". With cache,
    a matching record of RUN_DIR/evaluations.jsonl is returned instead, and a new one
    appended there."""
    from chatgot_jax import checkpoint as ckpt  # noqa: PLC0415

    if split not in SPLITS:
        raise InvalidArgument("split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
    run_path, path_step = ckpt.resolve(str(run_dir))
    with ckpt.make_manager(run_path, read_only=True) as manager:
        step = ckpt.choose_step(manager, str(run_dir), step if step is not None else path_step,
                                best)
        meta = ckpt.read_meta(manager, step)
    text, identity = corpus_of(meta.get("data"), data, run_path)
    key = {"step": step, "split": split, "sha256": identity["sha256"]}
    from chatgot_jax import config as config_lib  # noqa: PLC0415

    cfg = config_lib.from_dict(meta["config"], source=f"checkpoint {run_path} step {step}")
    context = cfg.model.max_seq_length if context is None else context
    if cache and (found := cached(run_path, {**key, "context": context})) is not None:
        return found
    params, cfg, tokenizer, _ = ckpt.load_for_inference(str(run_path), step=step)
    tokens = split_text(text, tokenizer, cfg.train.val_fraction, split)
    result = {"run_dir": str(run_path), **key, "data": identity["source"],
              **evaluate_tokens(params, cfg.model, tokens, context)}
    if cache:
        try:
            with open(run_path / EVALUATIONS, "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
        except OSError:  # a read-only run directory: evaluated, not remembered
            pass
    return result


def cached(run_path: pathlib.Path, key: dict) -> dict | None:
    """The newest record of run_path/evaluations.jsonl matching key, or None."""
    path = run_path / EVALUATIONS
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if all(record.get(k) == v for k, v in key.items()):
            found = record
    return found


def describe(r: dict) -> str:
    return (f"{r['run_dir']} step {r['step']}, {r['split']} split of {r['data']}: "
            f"{r['nats_per_char']:.4f} ± {r['se_nats']:.4f} nats/char "
            f"({r['bits_per_char']:.4f} ± {r['se_bits']:.4f} bits/char; ± 1 standard error "
            f"over {r['blocks']} blocks), {r['chars']:,} characters predicted, context "
            f"{r['context']}, {r['wall_time_s']:.1f} s")


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           epilog="How the characters are predicted and the standard error "
                                  "computed: docs/sweeps.md (full-split evaluation).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or one step's)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, metavar="N", help="this step's checkpoint")
    which.add_argument("--best", action="store_true",
                       help="the checkpoint with the lowest validation loss")
    p.add_argument("--data", metavar="PATH",
                   help="evaluate on this text (default: the run's own corpus)")
    p.add_argument("--split", choices=SPLITS, default="val", help="default val")
    p.add_argument("--context", type=int, metavar="N",
                   help="characters per window (default: the model's max_seq_length)")
    p.add_argument("--json", metavar="FILE", help="also write the result to this JSON file")
    return p


def run(args) -> dict:
    result = evaluate_run(args.run_dir, step=args.step, best=args.best, data=args.data,
                          split=args.split, context=args.context)
    print(describe(result))
    if args.json:
        try:
            pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {args.json}: {e.strerror}") from None
    return result


main = cli.entry_point(build_parser, run)
command = cli.command(main)  # the chatgot-evaluate console script and python -m

if __name__ == "__main__":
    command()
