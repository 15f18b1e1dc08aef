"""Convert ChatGoT weights between PyTorch state dicts and chatgot_jax run directories.

    python -m chatgot_jax.convert --from-torch STATE_DICT.pt --out RUN_DIR \\
        --tokenizer VOCAB.json [--layout decoder|encoder] [model.n_head=12 ...]
    python -m chatgot_jax.convert --to-torch --checkpoint RUN_DIR --out STATE_DICT.pt

--from-torch writes RUN_DIR/{config.json,tokenizer.json} and an Orbax checkpoint
at step 0 (with a fresh optimizer state) that sample.py reads and train.py
resumes from; --layout defaults to the one the keys show. The mapping and the
numerics are described in chatgot_jax/torch_weights.py and docs/parity.md.
"""

import pathlib

import numpy as np

from chatgot_jax import cli
from chatgot_jax import torch_weights as tw
from chatgot_jax.data import CharTokenizer
from chatgot_jax.errors import UserError


def from_torch(state_dict_path, out, tokenizer_path, layout=None, overrides=()) -> None:
    """Writes a run directory with a step-0 checkpoint of the state dict's weights."""
    state_dict = tw.load_state_dict(state_dict_path)
    layout = layout or tw.detect_layout(state_dict)
    cfg = tw.config_for(state_dict, layout, overrides)
    tw.check_state_dict(state_dict, cfg.model, layout)
    tokenizer = CharTokenizer.load(tokenizer_path)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(f"tokenizer {tokenizer_path} has vocab_size {tokenizer.vocab_size}, "
                        f"the state dict {cfg.model.vocab_size}: pass the model's tokenizer")
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from chatgot_jax import checkpoint  # noqa: PLC0415
    from chatgot_jax import run_dir as run_dir_lib  # noqa: PLC0415
    from chatgot_jax.train_lib import init_state  # noqa: PLC0415

    run_dir = pathlib.Path(out)
    if run_dir.exists() and (not run_dir.is_dir() or checkpoint.existing_steps(run_dir)):
        raise UserError(f"--out {out} exists and holds a file or checkpoints: "
                        "choose a new directory")
    params = tw.torch_to_params(state_dict, cfg.model, layout)
    state = init_state(cfg)  # a fresh optimizer state and rng for the converted params
    if jax.tree.map(np.shape, params) != jax.tree.map(np.shape, state["params"]):
        raise RuntimeError("converted params do not fit the model (a torch_weights.py bug)")
    state["params"] = jax.tree.map(jnp.asarray, params)
    lock = run_dir_lib.RunLock(run_dir)
    run_dir_lib.create(run_dir, lock)
    try:
        source = {"source": f"converted from {pathlib.Path(state_dict_path).resolve()}"}
        run_dir_lib.write_start(run_dir, cfg, tokenizer, run_dir_lib.Existing(),
                                run_dir_lib.provenance(source, jax.devices()[:1]))
        checkpoint.save(checkpoint.make_manager(run_dir, keep=cfg.train.keep), state, cfg,
                        tokenizer, opt_step=0)
    finally:
        lock.release()
    print(f"wrote {run_dir} (step 0, {layout} layout): {cfg.model}")


def to_torch(checkpoint_path, out, layout=None) -> None:
    """Writes the state dict of a checkpoint (for chatgot_jax.tools.torch_model.build)."""
    import torch  # noqa: PLC0415

    from chatgot_jax.checkpoint import load_for_inference  # noqa: PLC0415

    params, cfg, _, step = load_for_inference(checkpoint_path)
    layout = layout or ("decoder" if cfg.model.memory else "encoder")
    state_dict = tw.params_to_torch(params, cfg.model, layout)
    try:
        torch.save(state_dict, out)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}): pick a writable path") from None
    print(f"wrote {out} (step {step}): load it into torch_model.build(cfg, {layout!r}) "
          f"with cfg = {cfg.model}")


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description="Convert ChatGoT weights between PyTorch state dicts "
                                       "(chatgot_jax.tools.torch_model) and chatgot_jax "
                                       "run directories.")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-torch", metavar="STATE_DICT.pt",
                           help="convert this state dict into a run directory (--out)")
    direction.add_argument("--to-torch", action="store_true",
                           help="convert --checkpoint into a state dict file (--out)")
    p.add_argument("--out", required=True, help="run directory, or .pt file with --to-torch")
    p.add_argument("--tokenizer", metavar="VOCAB.json", help="tokenizer (with --from-torch)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="run directory or one step's directory (with --to-torch)")
    p.add_argument("--layout", choices=tw.LAYOUTS,
                   help="torch module layout (default: from the keys / model.memory)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="with --from-torch, e.g. model.n_head=12 (default d_model // 64)")
    return p


def run(args) -> None:
    try:
        import torch  # noqa: F401, PLC0415
    except ImportError:
        raise UserError("PyTorch is not installed: pip install -r requirements-torch.txt") \
            from None
    cli.quiet_orbax()
    if args.from_torch:
        if args.tokenizer is None or args.checkpoint is not None:
            raise UserError("--from-torch needs --tokenizer VOCAB.json and no --checkpoint")
        from_torch(args.from_torch, args.out, args.tokenizer, args.layout, args.overrides)
    else:
        if args.checkpoint is None or args.tokenizer is not None or args.overrides:
            raise UserError("--to-torch needs --checkpoint PATH and no --tokenizer or overrides")
        to_torch(args.checkpoint, args.out, args.layout)


main = cli.entry_point(build_parser, run)

if __name__ == "__main__":
    main()
