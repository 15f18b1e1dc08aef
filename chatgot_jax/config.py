"""Frozen config dataclasses, loaded from configs/*.yaml and overridden by `section.field=value`.

The dataclass defaults are the tiny variant; configs/VARIANT.yaml says only
what differs from them. One convention everywhere: overrides are
`model.d_model=128`, `train.lr=3e-4`, `mesh.fsdp=2`; train.py's named flags
(`--batch-size 8`) are shorthands for the same overrides.
"""

import dataclasses
import importlib.resources
import itertools
import pathlib
import typing
from typing import Any

import yaml

from chatgot_jax.errors import UserError

# The variants' YAML files: package data (an installed package needs no checkout), read
# through importlib.resources; the repository's top-level configs/ links here.
CONFIG_DIR = importlib.resources.files("chatgot_jax") / "configs"
# Each list of allowed names, defined here once.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "names")  # model.py maps them
COMPUTE_DTYPES = ("float32", "bfloat16")
MATMUL_DTYPES = ("auto", "float32", "bfloat16")  # model.matmul_dtype resolves auto
ATTENTION_IMPLS = ("auto", "einsum", "dot_product", "cudnn")
MEMORY_LENGTHS = (0, 1)
POSITIONS = ("learned", "sinusoidal")
# matrices: weight decay on kernels and embeddings (this project's default); all: on every
# parameter, as the original's torch.optim.AdamW(model.parameters(), weight_decay=...).
DECAY_RULES = ("matrices", "all")


class ConfigError(UserError):
    """A config value or key the user must fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The decoder's shape and numerics; the defaults are the tiny variant."""

    vocab_size: int = 96  # set from the tokenizer by train.py
    d_model: int = 256
    n_layers: int = 4
    n_head: int = 4
    d_hid: int = 512
    max_seq_length: int = 64
    dropout: float = 0.0
    # The original's unused cross-attention sublayer (parameter and numerics
    # parity with nn.TransformerDecoderLayer, not quality). memory_length 1: it
    # attends to one zero vector (the original's early code); 0: to an empty
    # memory, which in PyTorch adds exactly out_proj.bias (its later code).
    memory: bool = False
    memory_length: int = 1  # one of MEMORY_LENGTHS
    head_bias: bool = True  # the output head's bias (the original's later code has none)
    # learned: a trained position table; sinusoidal: the fixed sin/cos table of the
    # original's first code (computed, never trained).
    position: str = "learned"  # one of POSITIONS
    remat: str = "none"  # one of REMAT_POLICIES
    compute_dtype: str = "float32"  # one of COMPUTE_DTYPES (params stay float32)
    # The operands of the dense layers' products (one of MATMUL_DTYPES), with a float32
    # compute dtype: float32; bfloat16: operands rounded to bfloat16, products
    # accumulated and returned in float32, gradients too (model.bf16_dense); auto:
    # bfloat16 on a CPU with AMX, where XLA runs those products ~4x faster than float32
    # ones, float32 elsewhere and in KV-cache decoding (model.matmul_dtype resolves it).
    # With a bfloat16 compute dtype the products are bfloat16 whatever this says.
    matmul_dtype: str = "auto"
    # auto: cudnn on a CUDA GPU when the compute dtype is bfloat16 and the head dim
    #   allows it (model.attention_impl), else einsum.
    # einsum: explicit causal softmax with dropout on the attention weights (CPU,
    #   exact parity; the KV-cache decoding path whatever the choice).
    # dot_product: jax.nn.dot_product_attention with XLA's implementation.
    # cudnn: cuDNN's fused flash attention (CUDA GPUs only).
    # dot_product and cudnn have NO attention-weight dropout (the other dropouts stay).
    attention: str = "auto"
    layer_norm_eps: float = 1e-5  # PyTorch's default
    gelu_approximate: bool = False  # PyTorch's nn.GELU() is the exact erf form
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, data and bookkeeping; the defaults are the tiny variant."""

    batch_size: int = 16  # global micro-batch, split over all devices
    grad_accum: int = 1  # micro-batches per optimizer step (optax.MultiSteps)
    lr: float = 1.4e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # optimizer steps of linear warmup
    max_steps: int = 2500  # optimizer steps
    weight_decay: float = 0.01  # on the parameters train.decay names (see optim.py)
    decay: str = "matrices"  # one of DECAY_RULES
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # clip_by_global_norm
    seed: int = 0
    # Separate streams for a sweep's seed studies; -1 means train.seed.
    init_seed: int = -1  # parameter initialisation
    data_seed: int = -1  # batch order
    dropout_seed: int = -1  # dropout masks
    val_fraction: float = 0.1  # the last 10% of the corpus is validation
    eval_every: int = 500  # optimizer steps
    eval_windows: int = 256  # fixed validation windows of max_seq_length
    sample_tokens: int = 200  # characters sampled at each evaluation
    save_every: int = 500  # optimizer steps
    keep: int = 3  # last checkpoints kept (the best one is kept as well)
    log_every: int = 10  # optimizer steps between host syncs for metrics


# TrainConfig's seeds: runs whose configs differ only in these are seeds of one config.
SEED_FIELDS = ("seed", "init_seed", "data_seed", "dropout_seed")


def seed_of(cfg: TrainConfig, stream: str) -> int:
    """The seed of one random stream ("init", "data" or "dropout"): its own field, or train.seed."""
    value = getattr(cfg, f"{stream}_seed")
    return cfg.seed if value == -1 else value


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: -1 means all remaining devices."""

    data: int = -1
    fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()


# Fields that steer only bookkeeping, or that change the numbers no more than the order
# of float reductions does (remat recomputes; the mesh splits the same sums; the
# attention implementation computes the same softmax, though on a GPU cudnn has no
# attention-weight dropout): a run resumes with other values of these. Every other
# field changes the training.
BOOKKEEPING = {"train.max_steps", "train.eval_every", "train.eval_windows", "train.sample_tokens",
               "train.save_every", "train.keep", "train.log_every", "model.remat",
               "model.attention", "mesh.data", "mesh.fsdp"}

# Fields that fix the parameters' shapes: a run resumes only if these match.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_head", "d_hid", "max_seq_length",
                "memory", "memory_length", "head_bias", "position")

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def variants() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in CONFIG_DIR.iterdir()
                  if p.name.endswith(".yaml"))


def _coerce(section: str, name: str, field_type: Any, value: Any) -> Any:
    """Checks/converts one value to the field's type; bool is not an int here."""
    where = f"{section}.{name}"
    if field_type in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string
            value = float(value)
        except ValueError:
            pass
    if field_type is bool:
        if isinstance(value, bool):
            return value
    elif field_type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif field_type is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif field_type is str:
        if isinstance(value, str):
            return value
    raise ConfigError(
        f"{where} must be {field_type.__name__}, got {value!r}")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _apply(cfg: Config, section: str, values: dict, source: str) -> Config:
    if section not in SECTIONS:
        raise ConfigError(
            f"unknown config section '{section}' in {source}: "
            f"expected one of {', '.join(SECTIONS)}")
    if not isinstance(values, dict):
        raise ConfigError(f"'{section}' in {source} must be a mapping of field: value")
    sub = getattr(cfg, section)
    types = _field_types(type(sub))
    changes = {}
    for name, value in values.items():
        if name not in types:
            raise ConfigError(
                f"unknown config key '{section}.{name}' in {source}: "
                f"known keys are {', '.join(types)}")
        changes[name] = _coerce(section, name, types[name], value)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **changes)})


def parse_override(text: str) -> tuple[str, str, Any]:
    """'model.d_model=128' -> ('model', 'd_model', 128); values parse as YAML."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(
            f"bad override '{text}': write section.field=value, e.g. model.d_model=128")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return section, name, value


def load_config(variant: str | None = None, config_file: str | None = None,
                overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- configs/VARIANT.yaml <- --config FILE <- overrides, then validate."""
    cfg = Config()
    files = []
    if variant is not None:
        path = CONFIG_DIR / f"{variant}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown variant '{variant}': choose one of {', '.join(variants())}")
        files.append(path)
    if config_file is not None:
        files.append(pathlib.Path(config_file))
    for path in files:
        cfg = _apply_file(cfg, path)
    for text in overrides:
        section, name, value = parse_override(text)
        cfg = _apply(cfg, section, {name: value}, f"override '{text}'")
    validate(cfg)
    return cfg


def _apply_file(cfg: Config, path: pathlib.Path) -> Config:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
    if data is None:
        return cfg
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must be a mapping with sections {', '.join(SECTIONS)}")
    for section, values in data.items():
        cfg = _apply(cfg, str(section), values, str(path))
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "saved config") -> Config:
    """Rebuilds a Config saved with to_dict (e.g. from a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        cfg = _apply(cfg, section, values, source)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    m, t, mesh = cfg.model, cfg.train, cfg.mesh

    def positive(section, obj, *names):
        for name in names:
            if getattr(obj, name) <= 0:
                raise ConfigError(
                    f"{section}.{name} must be positive, got {getattr(obj, name)}")

    positive("model", m, "vocab_size", "d_model", "n_layers", "n_head", "d_hid",
             "max_seq_length", "layer_norm_eps")
    if m.d_model % m.n_head:
        raise ConfigError(
            f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    for name, allowed in (("remat", REMAT_POLICIES), ("compute_dtype", COMPUTE_DTYPES),
                          ("matmul_dtype", MATMUL_DTYPES),
                          ("attention", ATTENTION_IMPLS), ("memory_length", MEMORY_LENGTHS),
                          ("position", POSITIONS)):
        if getattr(m, name) not in allowed:
            raise ConfigError(
                f"model.{name} must be one of {', '.join(map(str, allowed))}, "
                f"got '{getattr(m, name)}'")
    positive("train", t, "batch_size", "grad_accum", "lr", "max_steps", "eval_every",
             "eval_windows", "save_every", "keep", "log_every", "grad_clip")
    for name in ("warmup_steps", "sample_tokens", "weight_decay", "seed"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    for name in ("init_seed", "data_seed", "dropout_seed"):
        if getattr(t, name) < -1:
            raise ConfigError(f"train.{name} must be >= 0, or -1 for train.seed, "
                              f"got {getattr(t, name)}")
    if t.decay not in DECAY_RULES:
        raise ConfigError(f"train.decay must be one of {', '.join(DECAY_RULES)}, "
                          f"got '{t.decay}'")
    for name in ("beta1", "beta2", "min_lr_ratio"):
        if not 0.0 <= getattr(t, name) <= 1.0:
            raise ConfigError(f"train.{name} must be in [0, 1], got {getattr(t, name)}")
    if not 0.0 < t.val_fraction < 1.0:
        raise ConfigError(f"train.val_fraction must be in (0, 1), got {t.val_fraction}")
    for name in ("data", "fsdp"):
        v = getattr(mesh, name)
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{name} must be a positive device count or -1, got {v}")


def parse_grid(text: str) -> list[list[str]]:
    """'a.b=1,2 c.d=x,y' -> [[a.b=1, c.d=x], [a.b=1, c.d=y], [a.b=2, c.d=x], ...]."""
    axes, keys = [], set()
    for part in text.split():
        key, sep, values = part.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot or not section or not field:
            raise ConfigError(f"bad grid part '{part}': write section.field=v1,v2,... "
                              f"e.g. model.remat=none,full")
        vals = values.split(",")
        if not all(vals):
            raise ConfigError(f"bad grid part '{part}': a value is empty")
        if len(set(vals)) != len(vals):
            raise ConfigError(f"bad grid part '{part}': a value is repeated")
        if key in keys:
            raise ConfigError(f"bad grid part '{part}': {key} is already an axis")
        keys.add(key)
        axes.append([f"{key}={v}" for v in vals])
    if not axes:
        raise ConfigError("the grid is empty: give section.field=v1,v2,... parts")
    return [list(point) for point in itertools.product(*axes)]
