"""ChatGoT weights between PyTorch state dicts and chatgot_jax params (torch optional).

The state dict is that of chatgot_jax.tools.torch_model (layout `decoder`:
nn.TransformerDecoder fed a zero memory, as the original; `encoder`:
nn.TransformerEncoder, no cross-attention). The shape (vocab, d_model,
n_layers, d_hid, context) comes from the tensors; model.memory = (layout ==
decoder). n_head cannot be read from the weights and changes the function; the
default guess is max(1, d_model // 64) (4 for tiny, 12 for small).

Numerics (all must match the PyTorch model the weights came from):
  * GELU: PyTorch's activation="gelu" is the exact erf form, our default;
    model.gelu_approximate=true selects the tanh approximation instead.
  * LayerNorm eps: 1e-5, PyTorch's default (model.layer_norm_eps).
  * Token embeddings are not scaled by sqrt(d_model) unless
    model.scale_embeddings=true.
  * The cross-attention of the decoder layout attends to one zero memory vector,
    so its output is a constant per layer; it is kept for exact parity.

Mapping (torch -> params; L.i = {decoder,encoder}.layers.i -> row i of blocks/*,
stacked on a leading layer axis; Linear weights (out, in) are transposed into
Flax kernels (in, out); LayerNorm weight -> scale):
  tok_emb.weight -> tok_emb/embedding, pos_emb.weight -> pos_emb
  L.i.self_attn.in_proj_{weight,bias} (rows q|k|v, head-major) -> blocks/qkv/{kernel,bias}
  L.i.self_attn.out_proj.* -> blocks/attn_out/*
  L.i.multihead_attn.in_proj_* rows [:D] -> blocks/memory/q/*, rows [D:] -> blocks/memory/kv/*
  L.i.multihead_attn.out_proj.* -> blocks/memory/out/*
  L.i.linear1.* -> blocks/fc/*, L.i.linear2.* -> blocks/proj/*
  L.i.norm1 -> blocks/ln1; decoder: norm2 -> blocks/memory/ln, norm3 -> blocks/ln2;
  encoder: norm2 -> blocks/ln2
  ln_f.* -> ln_f/*, head.{weight,bias} -> head/{kernel,bias}
"""

import collections
import functools
import operator
import re

import numpy as np

from chatgot_jax import config as config_lib
from chatgot_jax.errors import InvalidArgument, UserError

LAYOUTS = ("decoder", "encoder")
# State dict shape fields inferred from the tensors (n_head is not among them).
INFERRED = ("vocab_size", "d_model", "n_layers", "d_hid", "max_seq_length", "memory")


def _layer_table(cfg, layout: str):
    """(name in a layer, torch shape, param paths, transpose); two paths split rows at D."""
    D, F = cfg.d_model, cfg.d_hid
    blk, mem = ("blocks",), ("blocks", "memory")

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
    if layout == "decoder":
        rows += attention("multihead_attn", [mem + ("q",), mem + ("kv",)], mem + ("out",))
    rows += linear("linear1", (F, D), blk + ("fc",)) + linear("linear2", (D, F), blk + ("proj",))
    rows += norm("norm1", blk + ("ln1",))
    if layout == "decoder":
        rows += norm("norm2", mem + ("ln",))
    return rows + norm("norm3" if layout == "decoder" else "norm2", blk + ("ln2",))


def _tensors(cfg, layout: str):
    """(torch name, shape, param paths, transpose, layer or None), in state dict order."""
    D, V = cfg.d_model, cfg.vocab_size
    yield "tok_emb.weight", (V, D), [("tok_emb", "embedding")], False, None
    yield "pos_emb.weight", (cfg.max_seq_length, D), [("pos_emb",)], False, None
    table = _layer_table(cfg, layout)
    for i in range(cfg.n_layers):
        for name, shape, paths, transpose in table:
            yield f"{layout}.layers.{i}.{name}", shape, paths, transpose, i
    yield "ln_f.weight", (D,), [("ln_f", "scale")], False, None
    yield "ln_f.bias", (D,), [("ln_f", "bias")], False, None
    yield "head.weight", (V, D), [("head", "kernel")], True, None
    yield "head.bias", (V,), [("head", "bias")], False, None


def torch_shapes(cfg, layout: str) -> dict[str, tuple[int, ...]]:
    """Every state dict name of a ChatGoT of this shape and layout -> its shape, in order."""
    return {name: shape for name, shape, *_ in _tensors(cfg, layout)}


def _shape_text(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _check_layout(cfg, layout: str) -> None:
    if (layout == "decoder") != cfg.memory:
        raise InvalidArgument("layout", f"{layout} needs model.memory={layout == 'decoder'}, "
                                        f"the model has {cfg.memory}: use layout "
                                        f"{'decoder' if cfg.memory else 'encoder'}")


def check_state_dict(state_dict, cfg, layout: str) -> None:
    """UserError naming the first unexpected, wrongly shaped or missing tensor."""
    _check_layout(cfg, layout)
    expected = torch_shapes(cfg, layout)
    other = LAYOUTS[1 - LAYOUTS.index(layout)]
    for name, value in state_dict.items():
        if name not in expected:
            hint = (f": it is a state dict of the {other} layout"
                    if name.startswith(other + ".layers.")
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


def detect_layout(state_dict) -> str:
    for layout in LAYOUTS:
        if any(k.startswith(layout + ".layers.") for k in state_dict):
            return layout
    raise UserError("the state dict has no decoder.layers.N.* or encoder.layers.N.* "
                    "tensors: it is not a chatgot_jax.torch_model state dict")


def infer_shape(state_dict, layout: str) -> dict:
    """The ModelConfig shape fields (INFERRED) from the tensors; n_head is not among them.

    Each size is the most common among the tensors that carry it, so one wrongly
    shaped tensor is reported by check_state_dict rather than skewing the guess.
    """
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    layer_ids = {int(m.group(1)) for k in shapes
                 if (m := re.match(rf"{layout}\.layers\.(\d+)\.", k))}
    if not layer_ids:
        raise InvalidArgument("layout", f"{layout} does not fit: the state dict has no "
                                        f"{layout}.layers.N.* tensors")
    n_layers = max(layer_ids) + 1

    def vote(field, sources):
        found = [shapes[n][axis] for n, axis in sources
                 if n in shapes and len(shapes[n]) > axis]
        if not found:
            raise UserError(f"missing tensor {sources[0][0]} in the state dict "
                            f"(it gives {field})")
        return collections.Counter(found).most_common(1)[0][0]

    layer = [f"{layout}.layers.{i}." for i in range(n_layers)]
    return {
        "vocab_size": vote("vocab_size", [("tok_emb.weight", 0), ("head.weight", 0),
                                          ("head.bias", 0)]),
        "d_model": vote("d_model", [("tok_emb.weight", 1), ("pos_emb.weight", 1),
                                    ("ln_f.weight", 0), ("head.weight", 1)]
                        + [(p + "norm1.weight", 0) for p in layer]),
        "n_layers": n_layers,
        "d_hid": vote("d_hid", [(p + "linear1.weight", 0) for p in layer]
                      + [(p + "linear2.weight", 1) for p in layer]),
        "max_seq_length": vote("max_seq_length", [("pos_emb.weight", 0)]),
        "memory": layout == "decoder",
    }


def _numpy(value) -> np.ndarray:
    """Float32 numpy of a torch tensor or array (half precisions upcast exactly)."""
    return np.asarray(value.detach().cpu().float() if hasattr(value, "detach") else value,
                      dtype=np.float32)


def _set(tree, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def torch_to_params(state_dict, cfg, layout: str) -> dict:
    """A chatgot_jax params pytree (float32 numpy) from a torch_model state dict."""
    check_state_dict(state_dict, cfg, layout)
    pieces = {}  # param path -> per-layer (or single) numpy arrays
    for name, _, paths, transpose, _ in _tensors(cfg, layout):
        tensor = _numpy(state_dict[name])
        parts = np.split(tensor, [cfg.d_model]) if len(paths) == 2 else [tensor]
        for path, part in zip(paths, parts):
            pieces.setdefault(path, []).append(part.T if transpose else part)
    params = {}
    for path, parts in pieces.items():
        value = np.stack(parts) if path[0] == "blocks" else parts[0]
        _set(params, path, np.array(value, dtype=np.float32, order="C"))
    return params


def params_to_torch(params, cfg, layout: str) -> dict:
    """The torch_model state dict (float32 CPU tensors, PyTorch's order) of a params pytree."""
    import torch

    _check_layout(cfg, layout)
    leaves, out = {}, {}
    for name, _, paths, transpose, i in _tensors(cfg, layout):
        for path in paths:
            if path not in leaves:
                leaves[path] = np.asarray(functools.reduce(operator.getitem, path, params),
                                          dtype=np.float32)
        parts = [leaves[p] if i is None else leaves[p][i] for p in paths]
        parts = [p.T if transpose else p for p in parts]
        value = np.concatenate(parts) if len(parts) > 1 else parts[0]
        out[name] = torch.from_numpy(np.array(value, dtype=np.float32, order="C"))
    return out


def load_state_dict(path: str) -> dict:
    """A state dict of tensors saved with torch.save(model.state_dict(), path)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"state dict file {path} not found") from None
    except Exception as e:  # unpickling errors have many types
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read {path} with torch.load: {first}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} is not a state dict of tensors: save model.state_dict()")
    return obj


def config_for(state_dict, layout: str, overrides=()) -> config_lib.Config:
    """Defaults <- the shape read from the state dict <- overrides (which may not change it)."""
    shape = infer_shape(state_dict, layout)
    given = {config_lib.parse_override(o)[:2] for o in overrides}
    n_head = max(1, shape["d_model"] // 64)
    if ("model", "n_head") not in given and shape["d_model"] % n_head:
        raise UserError(f"cannot guess n_head for d_model {shape['d_model']}: "
                        "pass model.n_head=N")
    inferred = [f"model.{k}={v}" for k, v in shape.items()] + [f"model.n_head={n_head}"]
    cfg = config_lib.load_config(overrides=inferred + list(overrides))
    for field, value in shape.items():
        if getattr(cfg.model, field) != value:
            raise UserError(f"model.{field}={getattr(cfg.model, field)} contradicts the "
                            f"state dict ({field} {value}): drop that override")
    return cfg
