"""The PyTorch baseline of `python -m chatgot_jax.tools.bench --torch`: the original model in torch.nn.

Same shapes and dropout as the JAX config (chatgot_jax/tools/torch_model.py, layout
`encoder`, or `decoder` with model.memory=true), float32, train mode, and
torch.optim.AdamW with the JAX run's lr, betas, eps (1e-8) and weight decay on
the same parameters (matrices and embeddings, not biases or LayerNorms).
One step = forward, cross-entropy, backward, clip_grad_norm_ (train.grad_clip),
optimizer step, zero_grad. The learning rate is constant (no schedule): it
does not change the cost of a step.

bench.py imports this module only for --torch; importing it imports torch.
"""

import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from chatgot_jax.tools import torch_model
from chatgot_jax.config import Config


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with decay on the parameters optim.decay_mask names: those of two or more
    dimensions (train.decay=matrices), or all of them (train.decay=all)."""
    params = list(model.parameters())
    t = cfg.train
    decayed = [p.ndim >= 2 or t.decay == "all" for p in params]
    groups = [{"params": [p for p, d in zip(params, decayed) if d],
               "weight_decay": t.weight_decay},
              {"params": [p for p, d in zip(params, decayed) if not d], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)


def pick_device(jax_platform: str) -> torch.device:
    """CUDA when JAX runs on a GPU and torch sees one, else the CPU."""
    if jax_platform == "gpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class TorchTrainer:
    """The PyTorch train step on one fixed random batch; run(n) -> per-step seconds."""

    def __init__(self, cfg: Config, jax_platform: str = "cpu", seed: int = 0):
        torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(seed)
        self.device = pick_device(jax_platform)
        self.layout = "decoder" if cfg.model.memory else "encoder"
        self.model = torch_model.build(cfg.model, self.layout).to(self.device).train()
        self.opt = make_optimizer(self.model, cfg)
        self.clip = cfg.train.grad_clip
        self.vocab_size = cfg.model.vocab_size
        B, T = cfg.train.batch_size, cfg.model.max_seq_length
        tokens = np.random.default_rng(seed).integers(0, self.vocab_size, (B, T + 1))
        tokens = torch.from_numpy(tokens).to(self.device)
        self.x, self.y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        self.loss = float("nan")
        self.info = {"torch_version": torch.__version__,
                     "torch_threads": torch.get_num_threads(),
                     "torch_device": str(self.device), "torch_layout": self.layout,
                     "torch_params": sum(p.numel() for p in self.model.parameters())}

    def step(self) -> float:
        logits = self.model(self.x)
        loss = F.cross_entropy(logits.reshape(-1, self.vocab_size), self.y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()  # waits for the step, as the JAX side's block_until_ready

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            self.loss = self.step()
            times.append(time.perf_counter() - t)
        return times
