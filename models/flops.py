"""Parameter counts, training FLOPs per token (PaLM appendix B) and MFU for the decoder config.

PaLM (Chowdhery et al. 2022, appendix B): a dense decoder costs 6·N FLOPs per token for the forward
and backward matmuls over its N weights, plus 12·L·H·Dh·T for self-attention over T keys (QK^T and
AV: 2 matmuls × 2 FLOPs per multiply-add × 3 for forward + backward). Here N counts every matmul
weight: the attention and MLP kernels plus the output projection (the LM head, also when it shares
the embedding table); the embedding lookup and the norm scales are not matmuls and are left out.

Causal attention is counted honestly: a query at position i attends to ~i keys, so the average over a
sequence is T/2 and `attention_flops(..., causal=True)` is half of the full 12·L·H·Dh·T. MFU figures
computed with causal=True are therefore lower than ones using the full PaLM term.
"""

from __future__ import annotations

from typing import Any

H100_BF16_PEAK_FLOPS = 989e12


def _layer_matmul_params(cfg: Any) -> int:
    attn = cfg.emb_dim * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # q, out, k, v
    mlp = 3 * cfg.emb_dim * cfg.mlp_dim  # SwiGLU: gate, up, down
    return attn + mlp


def count_params(cfg: Any) -> int:
    """Trainable parameters of models/decoder.py's Decoder for `cfg` (no allocation)."""
    per_layer = _layer_matmul_params(cfg) + 2 * cfg.emb_dim  # two RMSNorm scales
    embeddings = cfg.vocab_size * cfg.emb_dim * (1 if cfg.tie_embeddings else 2)
    return cfg.num_layers * per_layer + embeddings + cfg.emb_dim  # + final norm


def matmul_params(cfg: Any) -> int:
    """N of 6·N: layer matmul weights plus the output projection (tied or not)."""
    return cfg.num_layers * _layer_matmul_params(cfg) + cfg.vocab_size * cfg.emb_dim


def attention_flops(cfg: Any, seq_len: int, *, causal: bool = True) -> float:
    """Training attention FLOPs per token: 12·L·H·Dh·T, halved for causal attention."""
    full = 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return full / 2 if causal else full


def training_flops_per_token(cfg: Any, seq_len: int, *, causal: bool = True) -> float:
    """Forward + backward FLOPs per token: 6·N + attention (PaLM appendix B)."""
    return 6.0 * matmul_params(cfg) + attention_flops(cfg, seq_len, causal=causal)


def mfu(flops_per_step: float, step_time_s: float, *, num_devices: int = 1,
        peak_flops_per_device: float = H100_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak FLOP/s."""
    if step_time_s <= 0:
        raise ValueError(f"step time must be positive, got {step_time_s}")
    return flops_per_step / step_time_s / (num_devices * peak_flops_per_device)
