"""The sample command: chatgot-sample (or python sample.py in the repository) samples text
from a trained ChatGoT checkpoint, streaming one sample as it is produced. From Python:
chatgot_jax.load(RUN_DIR).generate(...)."""

import argparse
import sys

from chatgot_jax import cli
from chatgot_jax.errors import UserError

DESCRIPTION = """\
Generate text from a checkpoint made by train.py. The model config and the
tokenizer come from the checkpoint. The prompt must be non-empty (the model has
no start token) and use only characters of the model's vocabulary. Without
--prompt or --prompt-file, it is the run's own evaluation prompt (the speaker
prompt its training log sampled from, RUN_DIR/prompt.txt), or a newline for a
run that has none (one converted, or trained before runs stored it).

Context: the model sees at most max_seq_length characters. A longer prompt keeps
its last max_seq_length - 1 characters; once prompt + output fill the context,
the window slides: the last max_seq_length - 1 characters are re-read and
generation goes on (each further character then costs one full re-read).
"""


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a run directory (latest checkpoint) or one step's checkpoint directory")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, metavar="N", help="load this step's checkpoint")
    which.add_argument("--best", action="store_true",
                       help="load the checkpoint with the lowest validation loss")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", metavar="TEXT",
                        help="the text to continue (non-empty; default: the run's evaluation "
                             "prompt, else a newline)")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, metavar="N", default=500,
                   help="characters to generate per sample (default 500)")
    p.add_argument("--temperature", type=float, metavar="T", default=0.8,
                   help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, metavar="K", default=0,
                   help="sample only from the K most likely characters; 0 = off (default 0)")
    p.add_argument("--top-p", type=float, metavar="P", default=1.0,
                   help="nucleus sampling: the smallest set of characters whose probability "
                        "reaches P, in (0, 1]; 1 = off (default 1.0)")
    p.add_argument("--num-samples", type=int, metavar="B", default=1,
                   help="independent samples, generated as one batch (default 1)")
    p.add_argument("--seed", type=int, metavar="S", default=0, help="random seed (default 0)")
    return p


def read_prompt(args) -> str | None:
    """--prompt, or --prompt-file's text, or None (the run's default)."""
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is None:
        return None
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"prompt file {args.prompt_file} not found") from None
    except IsADirectoryError:
        raise UserError(f"prompt file {args.prompt_file} is a directory; give a text file") \
            from None
    except UnicodeDecodeError:
        raise UserError(f"prompt file {args.prompt_file} is not valid UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read prompt file {args.prompt_file}: {e.strerror}") from None


def default_prompt(checkpoint: str) -> tuple[str, str]:
    """(prompt, where it comes from): the run's stored evaluation prompt, else a newline."""
    from chatgot_jax.checkpoint import run_dir_of  # noqa: PLC0415
    from chatgot_jax.run_dir import PROMPT_FILE  # noqa: PLC0415

    path = run_dir_of(checkpoint) / PROMPT_FILE
    try:
        stored = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "\n", "the run stores none (no prompt.txt), so a newline:"
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): give --prompt") from None
    return stored, "the run's evaluation prompt"


def run(args) -> None:
    prompt = read_prompt(args)
    from chatgot_jax import sampling  # noqa: PLC0415 (--help stays instant)
    from chatgot_jax.checkpoint import load_for_inference  # noqa: PLC0415

    if prompt == "":  # fail before loading the checkpoint
        sampling.check_prompt(None, prompt)
    sampling.check_sampling_args(args.max_new_tokens, args.temperature, args.top_k,
                                 args.top_p, args.num_samples)
    params, cfg, tokenizer, step = load_for_inference(args.checkpoint, step=args.step,
                                                      best=args.best)
    where = None
    if prompt is None:
        prompt, where = default_prompt(args.checkpoint)
    sampling.check_prompt(tokenizer, prompt)  # before anything is printed
    print(f"loaded step {step} from {args.checkpoint}", file=sys.stderr)
    if where is not None:
        print(f"prompt: {where} {prompt!r}", file=sys.stderr)
    n, out = args.num_samples, sys.stdout

    def stream(i, piece):  # sample 1 streams live; the others print when done
        if i == 0:
            out.write(piece)
            out.flush()

    if n > 1:
        out.write(f"--- sample 1/{n} ---\n")
    out.write(prompt)
    out.flush()
    texts = sampling.generate(params, cfg.model, tokenizer, prompt,
                              max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, num_samples=n, seed=args.seed,
                              on_text=stream)
    out.write("\n")
    for i, text in enumerate(texts[1:], start=2):
        out.write(f"--- sample {i}/{n} ---\n{prompt}{text}\n")
    out.flush()


main = cli.entry_point(build_parser, run)
command = cli.command(main)  # the chatgot-sample console script and sample.py

if __name__ == "__main__":
    command()
