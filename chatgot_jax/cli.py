"""Entry-point logic behind train.py (kept importable and testable)."""

from chatgot_jax.errors import UserError, cli_main


def init_distributed(coordinator, num_processes, process_id) -> None:
    """jax.distributed.initialize when a coordinator is given; a no-op otherwise."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if not any(given):
        return
    if not all(given):
        raise UserError("multi-process training needs all of --coordinator HOST:PORT, "
                        "--num-processes N and --process-id I")
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    import jax  # noqa: PLC0415
    # Cross-process collectives on CPU devices (only the CPU client reads this);
    # nothing may touch a backend before jax.distributed.initialize.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


@cli_main
def run_training(args, overrides) -> dict:
    import absl.logging  # noqa: PLC0415

    from chatgot_jax import config as config_lib  # noqa: PLC0415
    from chatgot_jax import trainer  # noqa: PLC0415

    absl.logging.set_verbosity(absl.logging.ERROR)  # orbax's info/warning chatter
    cfg = config_lib.load_config(args.variant, args.config, overrides)
    init_distributed(args.coordinator, args.num_processes, args.process_id)
    out = args.out or f"runs/{args.variant}"
    return trainer.train_and_evaluate(cfg, args.data, out, resume=args.resume)
