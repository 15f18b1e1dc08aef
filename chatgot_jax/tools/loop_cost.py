"""What train.py's loop costs per step on the host, apart from the train step's compute:

    python -m chatgot_jax.tools.loop_cost [train.py arguments]

Runs train.py's own loop (batches, dispatch, metrics, progress bar, logging,
saves) with a train step that computes nothing: it only advances the
optimizer's step counter of the real train state and returns constant metrics.
The steps per second it reaches are the ceiling the loop puts on any model; compare
them with the real step's time from `python -m chatgot_jax.tools.bench`.
Give it a fresh --out: the run directory it writes holds an untrained model.
"""

import jax
import jax.numpy as jnp

from chatgot_jax import cli, train_cli, train_lib


def make_idle_train_step(cfg, mesh, shardings):
    """A drop-in for train_lib.make_resident_train_step that does no work."""
    def idle_step(state, h, tokens, starts_KxB, first):
        opt_state = state["opt_state"]
        mini = opt_state.mini_step + 1
        done = mini == cfg.train.grad_accum  # a whole optimizer step
        opt_state = opt_state._replace(mini_step=jnp.where(done, 0, mini),
                                       gradient_step=opt_state.gradient_step + done)
        one = jnp.float32(1.0)
        return ({**state, "opt_state": opt_state},
                {"loss": one, "grad_norm": one, "lr": jnp.float32(0.0),
                 "opt_step": opt_state.gradient_step})

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(idle_step, out_shardings=(shardings, replicated), donate_argnums=0)


def main(argv=None, *, until_exit: bool = False):
    """train_cli.main with the idle train step."""
    real = train_lib.make_resident_train_step
    train_lib.make_resident_train_step = make_idle_train_step
    try:
        return train_cli.main(argv, until_exit=until_exit)
    finally:
        train_lib.make_resident_train_step = real


if __name__ == "__main__":
    cli.command(main)()
