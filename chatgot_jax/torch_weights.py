"""ChatGoT weights between PyTorch state dicts and chatgot_jax params (torch optional).

Five module layouts, told apart by their tensor names (detect_layout):
  decoder, encoder  this project's PyTorch re-creation (chatgot_jax.tools.torch_model):
                    tok_emb, pos_emb, {decoder,encoder}.layers.N, ln_f, head
  craft             the original ChatGoT's code from 2025-03-29 on (what it trained
                    with): token_embedding * sqrt(d_model) + position_embedding,
                    transformer_decoder.layers.N (nn.TransformerDecoderLayer fed a
                    zero-LENGTH memory: its cross-attention adds out_proj.bias),
                    transformer_decoder.norm, output_layer without bias
  early             the original's code of 2025-03-28: the same names, no scaling,
                    a memory of one zero vector, output_layer with bias
  seed              the original's first code (2025-03-24): embedding * sqrt(d_model)
                    + the fixed sinusoidal buffer positional_encoding.pe,
                    transformer_encoder.layers.N, transformer_encoder.norm, decoder
                    (the output Linear, with bias)
LAYOUT_MODEL gives the model fields each layout implies. The shape (vocab,
d_model, n_layers, d_hid, context) comes from the tensors (for seed the context
is the original's config or the buffer's length). n_head cannot be read from
the weights and changes the function: the original's config.yaml gives it, else
model.n_head, else max(1, d_model // 64).

Numerics (all must match the PyTorch model the weights came from):
  * GELU: PyTorch's activation="gelu" is the exact erf form, our default;
    model.gelu_approximate=true selects the tanh approximation instead.
  * LayerNorm eps: model.layer_norm_eps (PyTorch's default 1e-5; the original's
    later configs set it).
  * The seed layout's buffer is loaded as pos_emb and kept fixed in training
    (model.position=sinusoidal), as the original kept it.

Mapping (torch -> params; L.i = the layout's layers.i -> row i of blocks/*,
stacked on a leading layer axis; Linear weights (out, in) are transposed into
Flax kernels (in, out); LayerNorm weight -> scale):
  token embedding -> tok_emb/embedding, position embedding (or pe[0, :T]) -> pos_emb
  L.i.self_attn.in_proj_{weight,bias} (rows q|k|v, head-major) -> blocks/qkv/{kernel,bias}
  L.i.self_attn.out_proj.* -> blocks/attn_out/*
  L.i.multihead_attn.in_proj_* rows [:D] -> blocks/memory/q/*, rows [D:] -> blocks/memory/kv/*
  L.i.multihead_attn.out_proj.* -> blocks/memory/out/*
  L.i.linear1.* -> blocks/fc/*, L.i.linear2.* -> blocks/proj/*
  L.i.norm1 -> blocks/ln1; decoder layers: norm2 -> blocks/memory/ln, norm3 -> blocks/ln2;
  encoder layers: norm2 -> blocks/ln2
  final norm -> ln_f/*, output {weight,bias} -> head/{kernel,bias}
"""

import collections
import dataclasses
import functools
import operator
import re

import numpy as np
import yaml

from chatgot_jax import config as config_lib
from chatgot_jax.errors import InvalidArgument, UserError

LAYOUTS = ("decoder", "encoder")  # this project's PyTorch re-creation
ORIGINAL_LAYOUTS = ("craft", "early", "seed")  # the original ChatGoT's code over its history
ALL_LAYOUTS = LAYOUTS + ORIGINAL_LAYOUTS
# State dict shape fields inferred from the tensors (n_head is not among them).
INFERRED = ("vocab_size", "d_model", "n_layers", "d_hid", "max_seq_length", "memory")


@dataclasses.dataclass(frozen=True)
class Names:
    """Where a layout keeps its tensors."""

    tok: str  # token embedding weight
    pos: str  # learned position weight (max_seq_length, D), or the seed's pe buffer
    layers: str  # prefix of layers.N
    final_norm: str
    head: str
    decoder_layer: bool  # nn.TransformerDecoderLayer (norm2 = memory LN, norm3 = ln2)


NAMES = {
    "decoder": Names("tok_emb.weight", "pos_emb.weight", "decoder.layers", "ln_f", "head", True),
    "encoder": Names("tok_emb.weight", "pos_emb.weight", "encoder.layers", "ln_f", "head", False),
    "craft": Names("token_embedding.weight", "position_embedding.weight",
                   "transformer_decoder.layers", "transformer_decoder.norm", "output_layer",
                   True),
    "early": Names("token_embedding.weight", "position_embedding.weight",
                   "transformer_decoder.layers", "transformer_decoder.norm", "output_layer",
                   True),
    "seed": Names("embedding.weight", "positional_encoding.pe", "transformer_encoder.layers",
                  "transformer_encoder.norm", "decoder", False),
}

# The model fields each layout implies (overrides may not contradict them). The
# re-creation's layouts leave scale_embeddings free.
_OWN = dict(memory_length=1, head_bias=True, position="learned")
LAYOUT_MODEL = {
    "decoder": dict(memory=True, **_OWN),
    "encoder": dict(memory=False, **_OWN),
    "craft": dict(memory=True, memory_length=0, head_bias=False, position="learned",
                  scale_embeddings=True),
    "early": dict(memory=True, memory_length=1, head_bias=True, position="learned",
                  scale_embeddings=False),
    "seed": dict(memory=False, memory_length=1, head_bias=True, position="sinusoidal",
                 scale_embeddings=True, layer_norm_eps=1e-5),  # its code set no eps
}


def layout_of(cfg) -> str:
    """The layout a model config implies when nothing recorded another (re-creation's
    layouts for learned positions with a head bias and a one-vector memory)."""
    for layout in ("decoder", "encoder", "craft", "seed"):
        if all(getattr(cfg, k) == v for k, v in LAYOUT_MODEL[layout].items()):
            return layout
    raise UserError("no PyTorch layout has this model's numerics (memory, memory_length, "
                    "head_bias, position, scale_embeddings): pass --layout")


def _layer_table(cfg, layout: str):
    """(name in a layer, torch shape, param paths, transpose); two paths split rows at D."""
    D, F = cfg.d_model, cfg.d_hid
    blk, mem = ("blocks",), ("blocks", "memory")
    decoder_layer = NAMES[layout].decoder_layer

    def linear(name, shape, path):
        return [(name + ".weight", shape, [path + ("kernel",)], True),
                (name + ".bias", shape[:1], [path + ("bias",)], False)]

    def norm(name, path):
        return [(name + ".weight", (D,), [path + ("scale",)], False),
                (name + ".bias", (D,), [path + ("bias",)], False)]

    def attention(name, in_paths, out_path):
        return [(name + ".in_proj_weight", (3 * D, D), [p + ("kernel",) for p in in_paths], True),
                (name + ".in_proj_bias", (3 * D,), [p + ("bias",) for p in in_paths], False),
                *linear(name + ".out_proj", (D, D), out_path)]

    rows = attention("self_attn", [blk + ("qkv",)], blk + ("attn_out",))
    if decoder_layer:
        rows += attention("multihead_attn", [mem + ("q",), mem + ("kv",)], mem + ("out",))
    rows += linear("linear1", (F, D), blk + ("fc",)) + linear("linear2", (D, F), blk + ("proj",))
    rows += norm("norm1", blk + ("ln1",))
    if decoder_layer:
        rows += norm("norm2", mem + ("ln",))
    return rows + norm("norm3" if decoder_layer else "norm2", blk + ("ln2",))


def _pos_shape(cfg, layout: str, pe_length: int | None = None):
    if layout == "seed":
        return (1, pe_length or cfg.max_seq_length, cfg.d_model)
    return (cfg.max_seq_length, cfg.d_model)


def _tensors(cfg, layout: str, pe_length: int | None = None):
    """(torch name, shape, param paths, transpose, layer or None), in state dict order."""
    D, V, n = cfg.d_model, cfg.vocab_size, NAMES[layout]
    yield n.tok, (V, D), [("tok_emb", "embedding")], False, None
    yield n.pos, _pos_shape(cfg, layout, pe_length), [("pos_emb",)], False, None
    table = _layer_table(cfg, layout)
    for i in range(cfg.n_layers):
        for name, shape, paths, transpose in table:
            yield f"{n.layers}.{i}.{name}", shape, paths, transpose, i
    yield n.final_norm + ".weight", (D,), [("ln_f", "scale")], False, None
    yield n.final_norm + ".bias", (D,), [("ln_f", "bias")], False, None
    yield n.head + ".weight", (V, D), [("head", "kernel")], True, None
    if cfg.head_bias:
        yield n.head + ".bias", (V,), [("head", "bias")], False, None


def torch_shapes(cfg, layout: str, pe_length: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every state dict name of a ChatGoT of this shape and layout -> its shape, in order."""
    return {name: shape for name, shape, *_ in _tensors(cfg, layout, pe_length)}


def _shape_text(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _check_layout(cfg, layout: str) -> None:
    if layout not in ALL_LAYOUTS:
        raise InvalidArgument("layout", f"must be one of {', '.join(ALL_LAYOUTS)}, "
                                        f"got {layout!r}")
    wrong = {k: v for k, v in LAYOUT_MODEL[layout].items() if getattr(cfg, k) != v}
    if wrong:
        try:
            hint = f": use layout {layout_of(cfg)}"
        except UserError:
            hint = ""
        raise InvalidArgument("layout", f"{layout} needs " + ", ".join(
            f"model.{k}={v}" for k, v in wrong.items()) + ", the model has " + ", ".join(
            f"{getattr(cfg, k)}" for k in wrong) + hint)


def pe_length_of(state_dict, layout: str) -> int | None:
    """The seed layout's buffer length (None for the other layouts)."""
    if layout != "seed":
        return None
    shape = tuple(getattr(state_dict.get(NAMES["seed"].pos), "shape", ()))
    return shape[1] if len(shape) == 3 else None


def check_state_dict(state_dict, cfg, layout: str) -> None:
    """UserError naming the first unexpected, wrongly shaped or missing tensor."""
    _check_layout(cfg, layout)
    pe_length = pe_length_of(state_dict, layout)
    if pe_length is not None and pe_length < cfg.max_seq_length:
        raise UserError(f"{NAMES['seed'].pos} holds {pe_length} positions, fewer than "
                        f"model.max_seq_length {cfg.max_seq_length}")
    expected = torch_shapes(cfg, layout, pe_length)
    for name, value in state_dict.items():
        if name not in expected:
            other = _layout_by_prefix(name)  # craft stands for early too: the same names
            same_names = {layout, other} <= {"craft", "early"}
            hint = (f": it is a state dict of the {other} layout"
                    if other not in (None, layout) and not same_names
                    else f" for a {layout}-layout ChatGoT")
            raise UserError(f"unexpected tensor {name} in the state dict{hint}")
        shape = tuple(getattr(value, "shape", ()))
        if shape != expected[name]:
            raise UserError(f"{name} has shape {_shape_text(shape)}, "
                            f"expected {_shape_text(expected[name])}")
    for name, shape in expected.items():
        if name not in state_dict:
            raise UserError(f"missing tensor {name} of shape {_shape_text(shape)} "
                            "in the state dict")


def _layout_by_prefix(name: str) -> str | None:
    for layout in ("craft", "seed", "decoder", "encoder"):  # transformer_* before the rest
        if name.startswith(NAMES[layout].layers + "."):
            return layout
    return None


def detect_layout(state_dict) -> str:
    """The layout whose tensor names the state dict has (craft and early share names;
    early's output layer has a bias, craft's none)."""
    for name in state_dict:
        layout = _layout_by_prefix(name)
        if layout == "craft":
            return "early" if NAMES["early"].head + ".bias" in state_dict else "craft"
        if layout is not None:
            return layout
    first = ", ".join(list(state_dict)[:3]) or "none"
    raise UserError("the state dict's tensor names fit no known ChatGoT layout (craft, early, "
                    f"seed, decoder, encoder): its first tensors are {first}")


def infer_shape(state_dict, layout: str) -> dict:
    """The ModelConfig shape fields (INFERRED) from the tensors; n_head is not among them.

    Each size is the most common among the tensors that carry it, so one wrongly
    shaped tensor is reported by check_state_dict rather than skewing the guess.
    The seed layout's context is its buffer's length (the original's config may
    give a shorter one).
    """
    n = NAMES[layout]
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    layer_ids = {int(m.group(1)) for k in shapes
                 if (m := re.match(rf"{re.escape(n.layers)}\.(\d+)\.", k))}
    if not layer_ids:
        raise InvalidArgument("layout", f"{layout} does not fit: the state dict has no "
                                        f"{n.layers}.N.* tensors")
    n_layers = max(layer_ids) + 1

    def vote(field, sources):
        found = [shapes[name][axis] for name, axis in sources
                 if name in shapes and len(shapes[name]) > axis]
        if not found:
            raise UserError(f"missing tensor {sources[0][0]} in the state dict "
                            f"(it gives {field})")
        return collections.Counter(found).most_common(1)[0][0]

    layer = [f"{n.layers}.{i}." for i in range(n_layers)]
    pos_axes = (1, 2) if layout == "seed" else (0, 1)
    return {
        "vocab_size": vote("vocab_size", [(n.tok, 0), (n.head + ".weight", 0),
                                          (n.head + ".bias", 0)]),
        "d_model": vote("d_model", [(n.tok, 1), (n.pos, pos_axes[1]),
                                    (n.final_norm + ".weight", 0), (n.head + ".weight", 1)]
                        + [(p + "norm1.weight", 0) for p in layer]),
        "n_layers": n_layers,
        "d_hid": vote("d_hid", [(p + "linear1.weight", 0) for p in layer]
                      + [(p + "linear2.weight", 1) for p in layer]),
        "max_seq_length": vote("max_seq_length", [(n.pos, pos_axes[0])]),
        "memory": LAYOUT_MODEL[layout]["memory"],
    }


def _numpy(value) -> np.ndarray:
    """Float32 numpy of a torch tensor or array (half precisions upcast exactly)."""
    return np.asarray(value.detach().cpu().float() if hasattr(value, "detach") else value,
                      dtype=np.float32)


def _set(tree, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def check_sinusoidal(pe: np.ndarray, cfg) -> None:
    """The seed layout's buffer must be the sinusoidal table model.position names."""
    from chatgot_jax.model import sinusoidal_table  # noqa: PLC0415 (jax-free otherwise)

    table = pe[0]
    want = sinusoidal_table(table.shape[0], cfg.d_model)
    worst = float(np.max(np.abs(table - want)))
    if worst > 1e-3:  # float32 rounding of the angles stays far below this
        raise UserError(f"{NAMES['seed'].pos} is not the sinusoidal position table "
                        f"(differs by up to {worst:.3g}): the seed layout needs it")


def torch_to_params(state_dict, cfg, layout: str) -> dict:
    """A chatgot_jax params pytree (float32 numpy) from a state dict of this layout."""
    check_state_dict(state_dict, cfg, layout)
    pe_length = pe_length_of(state_dict, layout)
    pieces = {}  # param path -> per-layer (or single) numpy arrays
    for name, _, paths, transpose, _ in _tensors(cfg, layout, pe_length):
        tensor = _numpy(state_dict[name])
        if layout == "seed" and name == NAMES["seed"].pos:
            check_sinusoidal(tensor, cfg)
            tensor = tensor[0, :cfg.max_seq_length]
        parts = np.split(tensor, [cfg.d_model]) if len(paths) == 2 else [tensor]
        for path, part in zip(paths, parts):
            pieces.setdefault(path, []).append(part.T if transpose else part)
    params = {}
    for path, parts in pieces.items():
        value = np.stack(parts) if path[0] == "blocks" else parts[0]
        _set(params, path, np.array(value, dtype=np.float32, order="C"))
    return params


def params_to_torch(params, cfg, layout: str, pe_length: int | None = None) -> dict:
    """The state dict (float32 CPU tensors, PyTorch's order) of a params pytree.

    The seed layout's buffer is rebuilt at pe_length (default the context): its
    first max_seq_length rows are pos_emb as it is, the rest the sinusoidal table.
    """
    import torch

    from chatgot_jax.model import sinusoidal_table  # noqa: PLC0415

    _check_layout(cfg, layout)
    leaves, out = {}, {}
    for name, _, paths, transpose, i in _tensors(cfg, layout, pe_length):
        for path in paths:
            if path not in leaves:
                leaves[path] = np.asarray(functools.reduce(operator.getitem, path, params),
                                          dtype=np.float32)
        parts = [leaves[p] if i is None else leaves[p][i] for p in paths]
        parts = [p.T if transpose else p for p in parts]
        value = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if layout == "seed" and name == NAMES["seed"].pos:
            table = sinusoidal_table(max(pe_length or 0, cfg.max_seq_length), cfg.d_model)
            table[:cfg.max_seq_length] = value
            value = table[None]
        out[name] = torch.from_numpy(np.array(value, dtype=np.float32, order="C"))
    return out


# Prefixes that wrappers add to every key: DataParallel / DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_state_dict(path: str) -> tuple[dict, str]:
    """-> (state dict of tensors, container): a bare state dict ("state_dict") or the
    original's training checkpoint, a dict holding "model_state_dict"."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"state dict file {path} not found") from None
    except Exception as e:  # unpickling errors have many types
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read {path} with torch.load: {first}") from None
    container = "state_dict"
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj, container = obj["model_state_dict"], "model_state_dict"
    if (not isinstance(obj, dict) or not obj
            or not all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise UserError(f"{path} holds no model tensors: expected a state dict "
                        "(model.state_dict()) or a checkpoint dict with model_state_dict")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj, container


# The original's config.yaml model fields this project reads (others are ignored).
ORIGINAL_FIELDS = ("d_model", "n_layers", "n_head", "d_hid", "max_seq_length",
                   "layer_norm_eps", "dropout")


def read_original_config(path: str) -> dict:
    """{field: value} of ORIGINAL_FIELDS from the original's config.yaml, whose model
    settings are at experiment.model.config or model.config."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read {path} as YAML: {first}") from None
    for keys in (("experiment", "model", "config"), ("model", "config")):
        found = data
        for key in keys:
            found = found.get(key) if isinstance(found, dict) else None
        if isinstance(found, dict):
            return {k: found[k] for k in ORIGINAL_FIELDS if found.get(k) is not None}
    raise UserError(f"{path} has no experiment.model.config or model.config mapping: "
                    "pass the original run's config.yaml")


def config_for(state_dict, layout: str, overrides=(), original: dict | None = None
               ) -> config_lib.Config:
    """Defaults <- the layout's numerics and the tensors' shape <- the original's config
    (n_head, layer_norm_eps, dropout; the context for seed) <- overrides. Neither may
    contradict the tensors."""
    shape = infer_shape(state_dict, layout)
    original = dict(original or {})
    if layout == "seed" and "max_seq_length" in original:
        shape["max_seq_length"] = original["max_seq_length"]  # may be shorter than the buffer
    for field in ("d_model", "n_layers", "d_hid", "max_seq_length"):
        if field in original and original[field] != shape[field]:
            raise UserError(f"the original's config says {field} {original[field]}, the "
                            f"tensors {shape[field]}: pass the config of this checkpoint")
    given = {config_lib.parse_override(o)[:2] for o in overrides}
    n_head = original.get("n_head", max(1, shape["d_model"] // 64))
    if (("model", "n_head") not in given and "n_head" not in original
            and shape["d_model"] % n_head):
        raise UserError(f"cannot guess n_head for d_model {shape['d_model']}: "
                        "pass model.n_head=N or --original-config")
    implied = {**LAYOUT_MODEL[layout], **shape}
    from_original = {f"model.{k}": original[k] for k in ("layer_norm_eps", "dropout")
                     if k in original and k not in LAYOUT_MODEL[layout]}
    inferred = ([f"model.{k}={v}" for k, v in implied.items()] + [f"model.n_head={n_head}"]
                + [f"{k}={v}" for k, v in from_original.items()])
    cfg = config_lib.load_config(overrides=inferred + list(overrides))
    for field, value in implied.items():
        if getattr(cfg.model, field) != value:
            raise UserError(f"model.{field}={getattr(cfg.model, field)} contradicts the "
                            f"state dict ({layout} layout: {field} {value}): drop that "
                            "override")
    return cfg
