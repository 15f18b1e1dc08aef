"""Convert ChatGoT weights between PyTorch checkpoints and chatgot_jax run directories.

    python -m chatgot_jax.convert --from-torch CKPT.pt --out RUN_DIR \\
        --tokenizer TOKENIZER [--original-config config.yaml] [--layout L] [model.n_head=12 ...]
    python -m chatgot_jax.convert --to-torch --checkpoint RUN_DIR --out CKPT.pt [--layout L]

CKPT.pt is a state dict, or the original ChatGoT's training checkpoint (a dict
holding model_state_dict); TOKENIZER is this project's tokenizer.json or the
original's tokenizer directory (vocab.json). --from-torch writes RUN_DIR
(config.json, tokenizer.json, converted.json and an Orbax checkpoint at step 0
with a fresh optimizer state) that sample.py reads and train.py continues;
--layout defaults to the one the tensor names show (torch_weights.py lists them).
--to-torch writes the layout the run was converted from (converted.json), in the
same container. The numerics are described in torch_weights.py and docs/parity.md.
"""

import json
import pathlib

import numpy as np

from chatgot_jax import cli
from chatgot_jax import torch_weights as tw
from chatgot_jax.data import CharTokenizer
from chatgot_jax.errors import UserError


# What --from-torch records in the run directory for --to-torch.
CONVERTED = "converted.json"


def from_torch(state_dict_path, out, tokenizer_path, layout=None, overrides=(),
               original_config=None) -> None:
    """Writes a run directory with a step-0 checkpoint of the state dict's weights."""
    state_dict, container = tw.load_state_dict(state_dict_path)
    layout = layout or tw.detect_layout(state_dict)
    original = tw.read_original_config(original_config) if original_config else None
    cfg = tw.config_for(state_dict, layout, overrides, original)
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
        source = pathlib.Path(state_dict_path).resolve()
        run_dir_lib.write_start(run_dir, cfg, tokenizer, run_dir_lib.Existing(), 0,
                                run_dir_lib.provenance({"source": f"converted from {source}"},
                                                       jax.devices()[:1]))
        record = {"layout": layout, "container": container, "source": str(source),
                  "pe_length": tw.pe_length_of(state_dict, layout)}
        (run_dir / CONVERTED).write_text(json.dumps(record, indent=1) + "\n")
        with checkpoint.make_manager(run_dir, keep=cfg.train.keep) as manager:
            checkpoint.save(manager, state, cfg, tokenizer, opt_step=0)
    finally:
        lock.release()
    print(f"wrote {run_dir} (step 0, {layout} layout): {cfg.model}")
    print(f"next: chatgot-sample --checkpoint {run_dir} --prompt ...; to train on: "
          f"chatgot-train --out {run_dir} --resume --data CORPUS {model_overrides(cfg)}")


def model_overrides(cfg) -> str:
    """The model fields (those that differ from the defaults) train.py must be given to
    continue a run of this model."""
    from chatgot_jax import config as config_lib  # noqa: PLC0415

    given, default = config_lib.to_dict(cfg)["model"], config_lib.to_dict(config_lib.Config())
    return " ".join(f"model.{k}={v}" for k, v in given.items()
                    if k != "vocab_size" and v != default["model"][k])


def recorded_conversion(run_path) -> dict:
    """converted.json of the run directory that holds run_path ({} if none)."""
    for directory in (pathlib.Path(run_path), *pathlib.Path(run_path).parents[:2]):
        if (directory / CONVERTED).is_file():
            try:
                return json.loads((directory / CONVERTED).read_text())
            except (OSError, ValueError):
                raise UserError(f"cannot read {directory / CONVERTED}: pass --layout") from None
    return {}


def to_torch(checkpoint_path, out, layout=None) -> None:
    """Writes the state dict of a checkpoint in the layout it was converted from (else
    the one its numerics imply), in the same container."""
    import torch  # noqa: PLC0415

    from chatgot_jax.checkpoint import load_for_inference  # noqa: PLC0415

    params, cfg, _, step = load_for_inference(checkpoint_path)
    record = recorded_conversion(checkpoint_path)
    layout = layout or record.get("layout") or tw.layout_of(cfg.model)
    state_dict = tw.params_to_torch(params, cfg.model, layout, record.get("pe_length"))
    container = record.get("container", "state_dict")
    try:
        torch.save({"model_state_dict": state_dict} if container == "model_state_dict"
                   else state_dict, out)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}): pick a writable path") from None
    print(f"wrote {out} (step {step}, {layout} layout"
          f"{', in model_state_dict' if container == 'model_state_dict' else ''})")


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description="Convert ChatGoT weights between PyTorch checkpoints "
                                       "(the original ChatGoT's, or chatgot_jax.tools."
                                       "torch_model's) and chatgot_jax run directories.")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-torch", metavar="CKPT.pt",
                           help="convert this state dict or checkpoint into a run directory "
                                "(--out)")
    direction.add_argument("--to-torch", action="store_true",
                           help="convert --checkpoint into a state dict file (--out)")
    p.add_argument("--out", required=True, help="run directory, or .pt file with --to-torch")
    p.add_argument("--tokenizer", metavar="TOKENIZER",
                   help="tokenizer.json, or the original's tokenizer directory or vocab.json "
                        "(with --from-torch)")
    p.add_argument("--original-config", metavar="config.yaml",
                   help="the original run's config.yaml: n_head, layer_norm_eps, dropout "
                        "(with --from-torch)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="run directory or one step's directory (with --to-torch)")
    p.add_argument("--layout", choices=tw.ALL_LAYOUTS,
                   help="torch module layout (default: from the tensor names; with "
                        "--to-torch, the one the run was converted from)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="with --from-torch, e.g. model.n_head=12 (default d_model // 64)")
    return p


def run(args) -> None:
    try:
        import torch  # noqa: F401, PLC0415
    except ImportError:
        raise UserError("PyTorch is not installed: pip install -r requirements-torch.txt") \
            from None
    if args.from_torch:
        if args.tokenizer is None or args.checkpoint is not None:
            raise UserError("--from-torch needs --tokenizer TOKENIZER and no --checkpoint")
        from_torch(args.from_torch, args.out, args.tokenizer, args.layout, args.overrides,
                   args.original_config)
    else:
        if (args.checkpoint is None or args.tokenizer is not None or args.overrides
                or args.original_config is not None):
            raise UserError("--to-torch needs --checkpoint PATH and no --tokenizer, "
                            "--original-config or overrides")
        to_torch(args.checkpoint, args.out, args.layout)


main = cli.entry_point(build_parser, run)
command = cli.command(main, tune_cpu=False)  # the chatgot-convert console script and python -m

if __name__ == "__main__":
    command()
