"""The train command: chatgot-train (or python train.py in the repository) --variant tiny
[--data PATH] [section.field=value ...]. Its library function is trainer.train_and_evaluate
(and chatgot_jax.train from Python)."""

import os

from chatgot_jax import cli
from chatgot_jax.errors import InvalidArgument, UserError


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        description="Train the ChatGoT character-level GPT. Re-running with the same --out "
                    "resumes from its latest checkpoint.",
        epilog="Any config field can be set as section.field=value, e.g. model.d_model=128 "
               "train.warmup_steps=100 mesh.fsdp=2; the flags above are shorthands.")
    cli.add_config_arguments(p)
    p.add_argument("--out", help="run directory (default runs/VARIANT)")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint in --out to resume from (resuming is automatic)")
    p.add_argument("--coordinator",
                   help="HOST:PORT of process 0, for multi-process training (default: "
                        "$CHATGOT_COORDINATOR)")
    p.add_argument("--num-processes", type=int,
                   help="the number of processes (default: $CHATGOT_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int,
                   help="this process's index (default: $CHATGOT_PROCESS_ID)")
    return p


def init_distributed(coordinator, num_processes, process_id) -> None:
    """jax.distributed.initialize when a coordinator is given; a no-op otherwise."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if not any(given):
        return
    if not all(given):
        raise UserError("multi-process training needs all of --coordinator HOST:PORT, "
                        "--num-processes N and --process-id I")
    if not 0 <= process_id < num_processes:
        raise InvalidArgument("process_id", f"must be in [0, {num_processes}), got {process_id}")
    import jax  # noqa: PLC0415

    # Cross-process collectives on CPU devices (only the CPU client reads this);
    # nothing may touch a backend before jax.distributed.initialize.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def run(args) -> dict:
    from chatgot_jax import config as config_lib  # noqa: PLC0415 (--help stays instant)
    from chatgot_jax import trainer  # noqa: PLC0415
    from chatgot_jax.run_dir import ConfigDrift  # noqa: PLC0415

    cfg = config_lib.load_config(args.variant, args.config, cli.overrides_of(args))
    init_distributed(args.coordinator or os.environ.get("CHATGOT_COORDINATOR") or None,
                     args.num_processes or cli.env_int("CHATGOT_NUM_PROCESSES") or None,
                     args.process_id if args.process_id is not None
                     else cli.env_int("CHATGOT_PROCESS_ID"))
    out = args.out or f"runs/{args.variant}"
    try:
        return trainer.train_and_evaluate(cfg, args.data, out, resume=args.resume,
                                          command=args.command)
    except ConfigDrift as e:
        raise UserError(f"{e}: use another --out for a new run, or add --resume to continue "
                        f"this one with the new values") from None


main = cli.entry_point(build_parser, run)
command = cli.command(main)  # the chatgot-train console script and train.py

if __name__ == "__main__":
    command()
