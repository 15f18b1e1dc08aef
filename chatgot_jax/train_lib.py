"""Train state, device mesh, shardings, and the jitted train and eval steps.

The state is a plain pytree:
    {"params": ..., "opt_state": optax.MultiStepsState, "rng": uint32[2]}
The optimizer step is `opt_state.gradient_step` (the one step users see); the
micro-batches done are gradient_step * grad_accum + mini_step (micro_step()).
Dropout keys are fold_in(rng, micro-step), so every micro-step's randomness is
a function of (seed, micro-step) and resume is exact.

The train step is train_step(state, h, x, y) with h the optimizer's
hyper-parameters as arrays (optim.hyperparams): jitted as it is for one run,
vmapped over a leading run axis for a group of runs that share shapes (Program).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from chatgot_jax.config import Config, MeshConfig, seed_of
from chatgot_jax.data import batch_starts
from chatgot_jax.errors import UserError
from chatgot_jax.model import Decoder, cross_entropy, init_params
from chatgot_jax.optim import hyperparams, lr_at, make_optimizer

BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp) mesh; -1 takes every device the other axis leaves.

    With both axes given, their product may be less than the device count: the
    mesh then uses the first data * fsdp devices (e.g. mesh.data=1 for one GPU).
    """
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    data, fsdp = cfg.data, cfg.fsdp
    if data == -1 and fsdp == -1:
        raise UserError("mesh.data and mesh.fsdp cannot both be -1")
    if data == -1:
        data = n // fsdp if n % fsdp == 0 else 0
    elif fsdp == -1:
        fsdp = n // data if n % data == 0 else 0
    if not data or not fsdp or data * fsdp > n or (
            -1 in (cfg.data, cfg.fsdp) and data * fsdp != n):
        raise UserError(
            f"mesh.data={cfg.data} x mesh.fsdp={cfg.fsdp} does not fit the {n} devices: "
            f"use sizes whose product divides into {n} (or -1 for the rest)")
    used = np.asarray(devices[:data * fsdp]).reshape(data, fsdp)
    return Mesh(used, BATCH_AXES)


def check_batch(cfg: Config, mesh: Mesh) -> None:
    n = mesh.devices.size
    if cfg.train.batch_size % n:
        raise UserError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by the "
            f"number of devices ({n}): use a multiple of {n}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def leaf_spec(shape, fsdp: int) -> P:
    """Shards the largest dimension that fsdp divides along 'fsdp'; else replicates."""
    if fsdp == 1 or not shape:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, abstract_state):
    """Params and optimizer state: replicated, or FSDP-sharded when the mesh has fsdp > 1."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(x.shape, fsdp)),
                        abstract_state)


def init_state(cfg: Config, rng_seed: int | None = None):
    """The initial train state on the host's default device (unsharded).

    Parameters come from the init seed, the dropout rng from the dropout seed
    (both train.seed unless set; rng_seed overrides both).
    """
    init_seed, dropout_seed = (seed_of(cfg.train, "init"), seed_of(cfg.train, "dropout"))
    if rng_seed is not None:
        init_seed = dropout_seed = rng_seed
    params_key = jax.random.split(jax.random.key(init_seed))[0]
    dropout_key = jax.random.split(jax.random.key(dropout_seed))[1]
    params = init_params(cfg.model, params_key)
    return {
        "params": params,
        "opt_state": make_optimizer(cfg.train).init(params),
        "rng": jax.random.key_data(dropout_key),
    }


def tokens_trained(cfg: Config, step: int) -> int:
    """Tokens trained after `step` optimizer steps."""
    t = cfg.train
    return step * t.grad_accum * t.batch_size * cfg.model.max_seq_length


def optimizer_step(state) -> int:
    """Optimizer steps done (fetched from the device)."""
    return int(jax.device_get(state["opt_state"].gradient_step))


def micro_step(opt_state, grad_accum: int):
    """Micro-batches done: every optimizer step took grad_accum of them (traceable)."""
    return opt_state.gradient_step * grad_accum + opt_state.mini_step


def abstract_state(cfg: Config):
    return jax.eval_shape(lambda: init_state(cfg))


def sharded_abstract_state(cfg: Config, mesh: Mesh):
    """abstract_state with each leaf's sharding: what a checkpoint is restored into."""
    abstract = abstract_state(cfg)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, state_shardings(mesh, abstract))


def create_sharded_state(cfg: Config, mesh: Mesh):
    """Initialises the state directly into its shardings (no full copy on one device)."""
    shardings = state_shardings(mesh, abstract_state(cfg))
    return jax.jit(lambda: init_state(cfg), out_shardings=shardings)(), shardings


def loss_fn(params, cfg: Config, x_BxT, y_BxT, dropout_key=None, dropout_rate=None):
    """Mean cross-entropy; dropout when a key is given (at dropout_rate if given,
    a traced per-run rate, else cfg.model.dropout)."""
    deterministic = dropout_key is None
    rngs = None if deterministic else {"dropout": dropout_key}
    logits = Decoder(cfg.model).apply({"params": params}, x_BxT, deterministic=deterministic,
                                      rngs=rngs, dropout_rate=dropout_rate)
    return cross_entropy(logits, y_BxT)


def train_step_fn(cfg: Config):
    """The pure train step (state, h, x, y) -> (state, metrics).

    h: optim.hyperparams, plus "dropout" when the rate is a per-run value.
    """
    def train_step(state, h, x_BxT, y_BxT):
        micro = micro_step(state["opt_state"], cfg.train.grad_accum)
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), micro)
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], cfg, x_BxT, y_BxT, key,
                                                  h.get("dropout"))
        tx = make_optimizer(cfg.train, h)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        if cfg.model.position == "sinusoidal":  # a fixed table: weight decay must not move it
            updates = {**updates, "pos_emb": jnp.zeros_like(updates["pos_emb"])}
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "rng": state["rng"]}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": lr_at(state["opt_state"].gradient_step, h),  # lr of this update
                   "opt_step": opt_state.gradient_step}
        return new_state, metrics

    return train_step


def make_train_step(cfg: Config, mesh: Mesh, shardings):
    """jit(state, h, x, y) -> (state, metrics); the state is donated, h = hyperparams(cfg)."""
    data = batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    return jax.jit(train_step_fn(cfg), in_shardings=(shardings, replicated, data, data),
                   out_shardings=(shardings, replicated), donate_argnums=0)


# Micro-steps whose batch starts are uploaded together (device-resident batches).
STARTS_CHUNK = 1024


class ResidentBatches:
    """The training tokens on the device(s) once, and the window starts of STARTS_CHUNK
    micro-steps at a time: the train step cuts its batch there, so no batch is copied
    from the host per step. The starts are data.batch_starts(seed, micro-step), the
    same batches as data.get_batch gives; each process materialises only the rows
    its devices hold.
    """

    def __init__(self, cfg: Config, mesh: Mesh, tokens: np.ndarray, seed: int | list[int]):
        # A list of seeds (a sweep's group, one per run) gives starts of shape (R, K, B).
        self.cfg, self.mesh, self.seed, self.n = cfg, mesh, seed, len(tokens)
        replicated = NamedSharding(mesh, P())
        self.tokens = jax.make_array_from_callback(tokens.shape, replicated,
                                                   lambda index: tokens[index])
        self.first = None  # first micro-step of the uploaded chunk
        self.starts = self.first_dev = None

    def for_micro_step(self, micro: int):
        """(tokens, starts_KxB, first) for the train step at micro-step `micro`
        (starts_RxKxB with a list of seeds)."""
        if self.first is None or not self.first <= micro < self.first + STARTS_CHUNK:
            t = self.cfg.train

            def chunk(seed):
                return np.stack([batch_starts(self.n, seed=seed, step=m,
                                              batch_size=t.batch_size,
                                              seq_len=self.cfg.model.max_seq_length)
                                 for m in range(micro, micro + STARTS_CHUNK)]).astype(np.int32)

            if isinstance(self.seed, list):
                starts = np.stack([chunk(seed) for seed in self.seed])
                sharding = NamedSharding(self.mesh, P(None, None, BATCH_AXES))
            else:
                starts = chunk(self.seed)
                sharding = NamedSharding(self.mesh, P(None, BATCH_AXES))
            self.starts = jax.make_array_from_callback(starts.shape, sharding,
                                                       lambda index: starts[index])
            self.first = micro
            self.first_dev = jax.device_put(np.int32(micro), NamedSharding(self.mesh, P()))
        return self.tokens, self.starts, self.first_dev


def resident_step_fn(cfg: Config, mesh: Mesh):
    """The pure (state, h, tokens, starts_KxB, first) -> (state, metrics): the train step
    on the batch it cuts from the device-resident tokens at the starts of its
    micro-step (row micro - first of the chunk)."""
    step_fn, T = train_step_fn(cfg), cfg.model.max_seq_length
    data = batch_sharding(mesh)

    def resident_step(state, h, tokens, starts_KxB, first):
        micro = micro_step(state["opt_state"], cfg.train.grad_accum)
        starts_B = jax.lax.dynamic_index_in_dim(starts_KxB, micro - first, keepdims=False)
        windows = tokens[starts_B[:, None] + jnp.arange(T + 1)].astype(jnp.int32)
        windows = jax.lax.with_sharding_constraint(windows, data)
        return step_fn(state, h, windows[:, :-1], windows[:, 1:])

    return resident_step


def make_resident_train_step(cfg: Config, mesh: Mesh, shardings):
    """jit(resident_step_fn): the state is donated."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(resident_step_fn(cfg, mesh),
                   in_shardings=(shardings, replicated, replicated,
                                 NamedSharding(mesh, P(None, BATCH_AXES)), replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)


def train_hyperparams(cfg: Config, mesh: Mesh) -> dict:
    """hyperparams(cfg.train) on the mesh (replicated): the train step's h."""
    return jax.device_put(hyperparams(cfg.train), NamedSharding(mesh, P()))


def make_eval_step(cfg: Config, mesh: Mesh, shardings):
    """jit(params, x, y) -> mean loss of the batch, no dropout."""
    data = batch_sharding(mesh)
    return jax.jit(lambda params, x, y: loss_fn(params, cfg, x, y),
                   in_shardings=(shardings["params"], data, data),
                   out_shardings=NamedSharding(mesh, P()))


def put_batch(mesh: Mesh, local_x, local_y):
    """Global arrays from this process's rows of the batch."""
    sharding = batch_sharding(mesh)
    return (jax.make_array_from_process_local_data(sharding, local_x),
            jax.make_array_from_process_local_data(sharding, local_y))


def process_rows(global_batch: int) -> range:
    """The rows of every global batch that this process loads."""
    per = global_batch // jax.process_count()
    start = jax.process_index() * per
    return range(start, start + per)


class Program:
    """The jitted train and eval steps of R >= 1 runs whose configs share shapes.

    One run: its state as it is, make_resident_train_step and make_eval_step, with
    scalar metrics. R runs: their states stacked on a leading run axis (replicated:
    every device holds every run, and each run's batch is split over the mesh as
    for one run) and the same steps vmapped over it, each run with its own
    hyper-parameters (h, each leaf (R,)), batch starts and dropout keys; metrics
    and evaluation losses are (R,).
    """

    def __init__(self, cfgs: list[Config], mesh: Mesh):
        cfg, self.runs = cfgs[0], len(cfgs)
        run_shardings = state_shardings(mesh, abstract_state(cfg))
        if self.runs == 1:
            self.shardings = run_shardings
            self.train_step = make_resident_train_step(cfg, mesh, self.shardings)
            self.eval_step = make_eval_step(cfg, mesh, self.shardings)
            self.hyper = train_hyperparams(cfg, mesh)
            return
        replicated = NamedSharding(mesh, P())
        self.shardings = jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)),
                                      run_shardings)
        self.train_step = jax.jit(
            jax.vmap(resident_step_fn(cfg, mesh), in_axes=(0, 0, None, 0, None)),
            in_shardings=(self.shardings, replicated, replicated,
                          NamedSharding(mesh, P(None, None, BATCH_AXES)), replicated),
            out_shardings=(self.shardings, replicated), donate_argnums=0)
        batch = batch_sharding(mesh)
        self.eval_step = jax.jit(
            jax.vmap(lambda p, x, y: loss_fn(p, cfg, x, y), in_axes=(0, None, None)),
            in_shardings=(self.shardings["params"], batch, batch), out_shardings=replicated)
        per_run = [hyperparams(c.train) for c in cfgs]
        h = {k: jnp.stack([p[k] for p in per_run]) for k in per_run[0]}
        rates = [c.model.dropout for c in cfgs]
        if len(set(rates)) > 1:  # else the rate is compiled in, as for one run
            h["dropout"] = jnp.asarray(rates, jnp.float32)
        self.hyper = jax.device_put(h, replicated)

    def stack(self, states: list):
        """The program's state from one state per run."""
        if self.runs == 1:
            return states[0]
        return jax.jit(lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s),
                       out_shardings=self.shardings)(*states)

    def of_run(self, state, k: int):
        """Run k's state (new arrays for a group: the train step donates none of them)."""
        return state if self.runs == 1 else jax.tree.map(lambda a: a[k], state)
