"""The Python API, for notebooks and scripts: load a run, sample from it, score text, train.

    import chatgot_jax
    summary = chatgot_jax.train(variant="tiny", out="runs/nb", max_steps=200)
    model = chatgot_jax.load("runs/nb")                   # newest; step=N or step="best"
    model.generate("HAMLET: ", max_new_tokens=200)        # -> [continuation]
    model.loss("HAMLET: To be, or not to be")             # nats per character

The same code as the commands: load reads checkpoints as sample.py does,
generate is its jitted KV-cache sampler (the same text for the same
arguments), train is train.py's trainer.train_and_evaluate. Errors are the
library's types (chatgot_jax.errors: UserError for bad input, RunError for a
run that cannot go on); nothing here exits the process or changes its state.
"""

import dataclasses
import math
import pathlib

from chatgot_jax import config as config_lib
from chatgot_jax.data import CharTokenizer
from chatgot_jax.errors import InvalidArgument


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A trained model loaded from a run directory (chatgot_jax.load)."""

    config: config_lib.Config
    tokenizer: CharTokenizer
    params: dict  # the Flax params pytree, on one device
    step: int  # the checkpoint's optimizer step
    run_dir: pathlib.Path

    def generate(self, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 num_samples: int = 1) -> list[str]:
        """num_samples continuations of prompt (without it), as sample.py generates them."""
        from chatgot_jax import sampling  # noqa: PLC0415 (import chatgot_jax stays cheap)

        sampling.check_sampling_args(max_new_tokens, temperature, top_k, top_p, num_samples)
        sampling.check_prompt(self.tokenizer, prompt)
        return sampling.generate(self.params, self.config.model, self.tokenizer, prompt,
                                 max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, num_samples=num_samples, seed=seed)

    def loss(self, text: str) -> float:
        """Mean negative log-likelihood of text's characters after the first, in nats per
        character; each is predicted once, with the history chatgot_jax.evaluation gives it
        (up to max_seq_length characters, at least half a context after the first window).
        Divide by ln 2 for bits per character."""
        from chatgot_jax.evaluation import char_nll  # noqa: PLC0415

        if len(text) < 2:
            raise InvalidArgument("text", f"needs at least 2 characters to score, got "
                                          f"{len(text)}")
        unknown = self.tokenizer.unknown_chars(text)
        if unknown and not self.tokenizer.unk:
            raise InvalidArgument("text", f"has characters outside the model's vocabulary: "
                                          f"{', '.join(map(repr, unknown[:20]))}")
        return float(char_nll(self.params, self.config.model,
                              self.tokenizer.encode(text)).mean())

    def evaluate(self, data: str | None = None, split: str = "val",
                 context: int | None = None) -> dict:
        """Nats and bits per character over every character of a split of the run's corpus
        (or of data), with their standard errors: python -m chatgot_jax.evaluate's figure
        for this checkpoint (chatgot_jax.evaluate.evaluate_run)."""
        from chatgot_jax.evaluate import evaluate_run  # noqa: PLC0415

        return evaluate_run(self.run_dir, step=self.step, data=data, split=split,
                            context=context)

    def __repr__(self) -> str:
        m = self.config.model
        return (f"Model({str(self.run_dir)!r}, step={self.step}, d_model={m.d_model}, "
                f"n_layers={m.n_layers}, vocab={self.tokenizer.vocab_size})")


def load(run_dir, step: int | str | None = None) -> Model:
    """The model of a run directory (or one step's checkpoint directory) made by train.py,
    the sweep or the converter: its newest checkpoint, step=N, or step="best" (the lowest
    validation loss)."""
    from chatgot_jax.checkpoint import load_for_inference  # noqa: PLC0415

    best = step == "best"
    if not (step is None or best or (isinstance(step, int) and not isinstance(step, bool))):
        raise InvalidArgument("step", f"must be None, an int or 'best', got {step!r}")
    params, cfg, tokenizer, found = load_for_inference(str(run_dir),
                                                       step=None if best else step, best=best)
    return Model(cfg, tokenizer, params, found, pathlib.Path(run_dir))


def train(variant: str = "tiny", data: str | None = None, out: str | None = None,
          overrides=(), config: str | None = None, resume: bool = False, **fields) -> dict:
    """Trains (or resumes) a run as train.py does -> the summary dict it prints from
    (steps, tokens, wall_time_s, best_val_loss, best_val_bpc, checkpoint, interrupted).

    variant, config (a YAML file), data (a text file or a directory of .txt files;
    default the built-in Shakespeare) and out (default runs/VARIANT) are train.py's
    flags; overrides are "section.field=value" strings, and **fields any config field
    by its name (max_steps=200, lr=1e-3, d_model=128, fsdp=2; the mesh's data axis as
    the override mesh.data=N, since data is the corpus).
    """
    from chatgot_jax import trainer  # noqa: PLC0415

    given = [*overrides, *field_overrides(fields)]
    cfg = config_lib.load_config(variant, config, given)
    command = ["chatgot_jax.train", f"variant={variant}", f"data={data}", *given]
    return trainer.train_and_evaluate(cfg, data, out or f"runs/{variant}", resume=resume,
                                      command=command)


def field_overrides(fields: dict) -> list[str]:
    """{"max_steps": 200} -> ["train.max_steps=200"]: each name must be a field of exactly
    one config section (the mesh's "data" is not: write mesh.data=N in overrides)."""
    sections = {name: {f.name for f in dataclasses.fields(cls)}
                for name, cls in config_lib.SECTIONS.items()}
    out = []
    for name, value in fields.items():
        owners = [section for section, names in sections.items() if name in names]
        if len(owners) != 1:
            raise InvalidArgument(name, "is not a config field name: give one of "
                                        "ModelConfig's or TrainConfig's fields, or "
                                        "section.field=value in overrides")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(name, f"must be finite, got {value}")
        out.append(f"{owners[0]}.{name}={value}")
    return out
