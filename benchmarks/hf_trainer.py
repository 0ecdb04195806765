"""The reference trainer: HF transformers + PyTorch trained on our cache batches, our recipe.

What `benchmarks/convergence.py` compares zhchat against, and what the parity test checks our train
step with. The recipe is the trainer's (trainer/optimizers.py): global-norm clipping, then AdamW
with decoupled weight decay on matrices only (ndim >= 2), the learning rate of update t being
`schedule(t)`; the loss is the token cross-entropy over `decoder_loss_weights` plus
z_loss * log(Z)^2, from fp32 logits. Packed rows keep their documents apart as ours do: the
attention mask is block-diagonal by segment id (causal in decoders) and Llama positions restart
per document (`decoder_positions`). HF's own attention code reads the 4D masks as given.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from zhchat.scripts import hf_convert  # at import: it registers gin configurables

Batch = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """Optimizer and loss settings, the same values our trainer was bound with."""

    schedule: Callable[[int], float]   # learning rate of update t (0-based), e.g. make_schedule()
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    z_loss: float = 1e-4


def reference_model(config: Any, *, attention: str = "sdpa",
                    state_dict: Mapping[str, np.ndarray] | None = None) -> torch.nn.Module:
    """The HF model of our DecoderConfig (LlamaForCausalLM) or T5Config (T5ForConditionalGeneration),
    fp32: HF's default initialisation, or `state_dict` (HF names, e.g. hf_convert.decoder_to_hf).

    T5: transformers 5 ties a config-built T5's head to the embedding; it is untied and drawn as
    HF initialises an untied T5 v1.1 head (normal, std `initializer_factor`). Llama: no
    padding_idx, since id 0 is pad *and* each document's BOS in seqio decoder inputs (HF's
    nn.Embedding(padding_idx=0) would zero that row at init and never update it)."""
    import transformers

    if hasattr(config, "d_model"):
        hf_config = hf_convert.t5_config(config)
    else:
        hf_config = hf_convert.llama_config(config)
        hf_config.pad_token_id = None
    hf_config._attn_implementation = attention
    if state_dict is not None:
        return hf_convert.hf_model(hf_config, state_dict).train()
    hf = getattr(transformers, hf_config.architectures[0])(hf_config)
    head = getattr(hf, "lm_head", None)
    if hf_config.is_encoder_decoder and head.weight is hf.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(torch.empty_like(head.weight))
        torch.nn.init.normal_(head.weight, std=hf_config.initializer_factor)
    return hf


def _mask(query_segments: torch.Tensor, kv_segments: torch.Tensor, *, causal: bool,
          additive: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[batch, 1, q, kv] mask: keys of the same segment (and at or before the query if causal).
    Boolean (True = attend) for SDPA, or additive (0 / dtype min) for eager attention."""
    allowed = query_segments[:, :, None] == kv_segments[:, None, :]
    if causal:
        q, k = query_segments.shape[1], kv_segments.shape[1]
        allowed = allowed & torch.ones(q, k, dtype=torch.bool, device=allowed.device).tril()
    allowed = allowed[:, None]
    if not additive:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _segments(batch: Batch, prefix: str, tokens: str) -> np.ndarray:
    """Segment ids, or 1 on non-padding tokens of an unpacked batch (decoder targets start with
    id 0, so an unpacked decoder row is one segment)."""
    key = f"{prefix}_segment_ids"
    if key in batch:
        return batch[key]
    if prefix == "decoder":
        return np.ones_like(batch[tokens])
    return (batch[tokens] > 0).astype(np.int32)


def forward_logits(model: Any, batch: Batch, *, device: str) -> torch.Tensor:
    """Teacher-forced logits [batch, len, vocab] of a Llama or T5 model on one of our batches."""
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long, device=device)  # noqa: E731
    dec_in = t(batch["decoder_input_tokens"])
    dec_seg = t(_segments(batch, "decoder", "decoder_input_tokens"))
    if not model.config.is_encoder_decoder:
        positions = (t(batch["decoder_positions"]) if "decoder_positions" in batch else None)
        mask = _mask(dec_seg, dec_seg, causal=True, additive=False)
        return model(input_ids=dec_in, attention_mask=mask, position_ids=positions,
                     use_cache=False).logits
    enc_in = t(batch["encoder_input_tokens"])
    enc_seg = t(_segments(batch, "encoder", "encoder_input_tokens"))
    encoded = model.encoder(input_ids=enc_in,
                            attention_mask=_mask(enc_seg, enc_seg, causal=False, additive=True)
                            ).last_hidden_state
    hidden = model.decoder(input_ids=dec_in,
                           attention_mask=_mask(dec_seg, dec_seg, causal=True, additive=True),
                           encoder_hidden_states=encoded,
                           encoder_attention_mask=_mask(dec_seg, enc_seg, causal=False,
                                                        additive=True),
                           use_cache=False).last_hidden_state
    return model.lm_head(hidden)


def token_loss(logits: torch.Tensor, batch: Batch, *, z_loss: float, device: str
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss to minimise, metrics): weighted mean cross-entropy + z-loss, as our weighted_token_loss."""
    logits = logits.float()
    targets = torch.as_tensor(np.asarray(batch["decoder_target_tokens"]), dtype=torch.long,
                              device=device)
    weights = torch.as_tensor(np.asarray(batch["decoder_loss_weights"]), dtype=torch.float32,
                              device=device)
    log_z = torch.logsumexp(logits, dim=-1)
    target_logit = torch.gather(logits, -1, targets[..., None])[..., 0]
    denom = weights.sum().clamp(min=1.0)
    ce = ((log_z - target_logit) * weights).sum() / denom
    zl = (z_loss * log_z.square() * weights).sum() / denom
    return ce + zl, {"cross_entropy": ce, "z_loss": zl, "num_tokens": weights.sum()}


def make_optimizer(model: torch.nn.Module, recipe: Recipe, *, fused: bool) -> torch.optim.AdamW:
    """torch AdamW with our decay mask: matrices decay, vectors (norm scales) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, betas=(recipe.b1, recipe.b2), eps=recipe.eps,
                             fused=fused)


class Evaluator:
    """Held-out cross-entropy over a fixed list of batches (token-weighted, as our _EvalRunner)."""

    def __init__(self, batches: Iterable[Batch], *, device: str, autocast: bool):
        self.batches, self.device, self.autocast = list(batches), device, autocast

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> float:
        model.eval()
        total = weight = 0.0
        for batch in self.batches:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                logits = forward_logits(model, batch, device=self.device)
            _, m = token_loss(logits, batch, z_loss=0.0, device=self.device)
            total += float(m["cross_entropy"]) * float(m["num_tokens"])
            weight += float(m["num_tokens"])
        model.train()
        return total / max(weight, 1.0)


def train(model: torch.nn.Module, batches: Iterator[Batch], recipe: Recipe, *, num_steps: int,
          device: str, log_every: int = 10, eval_every: int = 0,
          evaluator: Evaluator | None = None, autocast: bool = False,
          on_log: Callable[[dict], None] | None = None) -> dict[str, list[dict]]:
    """Trains `model` in place for `num_steps` batches; returns {"history", "eval_history"} with
    the same keys and windows as our trainer (means over `log_every` steps; eval every
    `eval_every`). `autocast` runs the forward pass in bf16 on CUDA (fp32 parameters)."""
    model.to(device).train()
    opt = make_optimizer(model, recipe, fused=device.startswith("cuda"))
    params = [p for p in model.parameters() if p.requires_grad]
    history, eval_history, window = [], [], []
    t0 = time.perf_counter()
    for step in range(num_steps):
        batch = next(batches)
        for group in opt.param_groups:
            group["lr"] = float(recipe.schedule(step))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = forward_logits(model, batch, device=device)
        loss, metrics = token_loss(logits, batch, z_loss=recipe.z_loss, device=device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.clip_norm:
            torch.nn.utils.clip_grad_norm_(params, recipe.clip_norm)
        opt.step()
        window.append({"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}})
        done = step + 1
        if done % log_every == 0 or done == num_steps:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            row = {"step": done, "seconds_per_step": seconds / len(window),
                   **{k: float(np.mean([float(w[k]) for w in window])) for k in window[0]}}
            history.append(row)
            if on_log:
                on_log(row)
            window, t0 = [], time.perf_counter()
        if evaluator is not None and eval_every and done % eval_every == 0:
            paused = time.perf_counter()
            eval_history.append({"step": done, "cross_entropy": evaluator(model)})
            if on_log:
                on_log({"step": done, "eval/cross_entropy": eval_history[-1]["cross_entropy"]})
            t0 += time.perf_counter() - paused
    return {"history": history, "eval_history": eval_history}
