"""The original ChatGoT in PyTorch (torch.nn): the parity reference and the throughput baseline.

Two layouts of the same pre-LN network (norm_first=True, exact GELU, eps 1e-5):

    decoder: nn.TransformerDecoder layers (self-attention, cross-attention to a
             memory of zeros of shape (B, 1, D), MLP), like the original code
    encoder: nn.TransformerEncoder layers (self-attention, MLP), no cross-attention

both with learned token and position embeddings (nn.Embedding), a causal mask,
a final LayerNorm `ln_f` and an untied output Linear `head` with bias.

    model = build(cfg.model, "decoder").eval()
    logits_BxTxV = model(tokens_BxT)

This module imports torch (pip install -r requirements-torch.txt): the tests and
the benchmarks import it; the core library never does. Weight conversion lives
in chatgot_jax/torch_weights.py.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from chatgot_jax.torch_weights import LAYOUTS


class ChatGoT(nn.Module):
    """Embeddings, n_layers PyTorch transformer layers, final LayerNorm, output Linear."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_head: int,
                 d_hid: int, max_seq_length: int, dropout: float = 0.1,
                 layout: str = "decoder", layer_norm_eps: float = 1e-5,
                 gelu_approximate: bool = False, scale_embeddings: bool = False):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.d_model = d_model
        self.max_seq_length = max_seq_length
        self.emb_scale = math.sqrt(d_model) if scale_embeddings else None
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_seq_length, d_model)
        self.drop = nn.Dropout(dropout)
        # "gelu" is the exact erf form; the tanh form needs a callable.
        activation = (functools.partial(F.gelu, approximate="tanh") if gelu_approximate
                      else "gelu")
        layer_args = dict(d_model=d_model, nhead=n_head, dim_feedforward=d_hid,
                          dropout=dropout, activation=activation,
                          layer_norm_eps=layer_norm_eps, batch_first=True, norm_first=True)
        if layout == "decoder":
            self.decoder = nn.TransformerDecoder(
                nn.TransformerDecoderLayer(**layer_args), n_layers)
        else:
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(**layer_args), n_layers,
                enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 token ids, T <= max_seq_length -> (B, T, V) logits."""
        B, T = tokens.shape
        x = self.tok_emb(tokens)
        if self.emb_scale is not None:
            x = x * self.emb_scale
        x = x + self.pos_emb(torch.arange(T, device=tokens.device))
        x = self.drop(x)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=x.device,
                                                              dtype=x.dtype)
        if self.layout == "decoder":
            memory = x.new_zeros(B, 1, self.d_model)
            x = self.decoder(x, memory, tgt_mask=mask, tgt_is_causal=True)
        else:
            x = self.encoder(x, mask=mask, is_causal=True)
        return self.head(self.ln_f(x))


class Original(nn.Module):
    """The original ChatGoT's main-line model (its code from 2025-03-29 on, the `craft`
    layout of torch_weights.py), with its own tensor names: token embeddings scaled by
    sqrt(d_model) plus learned positions, dropout, an nn.TransformerDecoder (pre-LN,
    exact GELU) fed a zero-LENGTH memory (its cross-attention adds only out_proj.bias),
    the decoder's final LayerNorm, and an output Linear without bias."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.d_model
        self.d_model = D
        self.token_embedding = nn.Embedding(cfg.vocab_size, D)
        self.position_embedding = nn.Embedding(cfg.max_seq_length, D)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerDecoderLayer(D, cfg.n_head, cfg.d_hid, cfg.dropout,
                                           activation="gelu", batch_first=True,
                                           norm_first=True, layer_norm_eps=cfg.layer_norm_eps)
        self.transformer_decoder = nn.TransformerDecoder(
            layer, cfg.n_layers, norm=nn.LayerNorm(D, eps=cfg.layer_norm_eps))
        self.output_layer = nn.Linear(D, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 token ids -> (B, T, V) logits."""
        B, T = tokens.shape
        x = self.token_embedding(tokens) * math.sqrt(self.d_model)
        x = self.dropout(x + self.position_embedding(torch.arange(T, device=tokens.device)))
        memory = x.new_zeros(B, 0, self.d_model)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=x.device,
                                                              dtype=x.dtype)
        return self.output_layer(self.transformer_decoder(x, memory, tgt_mask=mask,
                                                          tgt_is_causal=True))


def build(cfg, layout: str = "decoder") -> ChatGoT:
    """A ChatGoT of a chatgot_jax ModelConfig's shape and numerics (float32, random init)."""
    return ChatGoT(cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_head, cfg.d_hid,
                   cfg.max_seq_length, dropout=cfg.dropout, layout=layout,
                   layer_norm_eps=cfg.layer_norm_eps, gelu_approximate=cfg.gelu_approximate,
                   scale_embeddings=cfg.scale_embeddings)
