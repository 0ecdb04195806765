"""Parameter mappings between zhchat's models and HF transformers, both ways, in fp32 numpy.

Decoder (models/decoder.py) <-> `LlamaForCausalLM`; T5 v1.1 (models/t5.py) <->
`T5ForConditionalGeneration`. `params` is the plain (`flax.linen.unbox`) parameter dict of the flax
module, unrolled (`layers_0`, `encoder_0`, ...) or scanned (`layers`, `encoder`, `decoder` with a
leading layer axis, `scan_layers=True`). A state dict maps HF parameter names to arrays.

Every weight maps one to one: a DenseGeneral kernel [in..., out...] is the transposed HF
`nn.Linear` weight [out, in] with the head axes flattened (no q/k permutation: our RoPE pairs the
two halves of the head dim, like HF Llama's rotate_half); T5's relative-position tables [heads,
buckets] are HF's embeddings [buckets, heads] in block 0 of each stack. A tied decoder's logits
are x @ embedding.T, unscaled, as HF Llama's with `tie_word_embeddings`. An HF T5 whose decoder
output is scaled (`scale_decoder_outputs`, the tied original T5) imports with the scale folded
into `logits_dense`. What has no counterpart is refused with the reason: biases, other
activations or RoPE types, another RMSNorm epsilon in T5.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from zhchat.models import stacks
from zhchat.models.decoder import DecoderConfig
from zhchat.models.t5 import T5Config
from zhchat.scripts.hf_tokenizer import export_tokenizer  # noqa: F401  (part of this API)

Params = dict[str, Any]
StateDict = dict[str, np.ndarray]
# our parameter path -> (HF name, number of leading input axes of the kernel (0: copied), factor
# applied on export (divided out on import))
Names = dict[tuple[str, ...], tuple[str, int, float]]

_DECODER_LAYER = {
    ("attention", "query", "kernel"): ("self_attn.q_proj.weight", 1),
    ("attention", "key", "kernel"): ("self_attn.k_proj.weight", 1),
    ("attention", "value", "kernel"): ("self_attn.v_proj.weight", 1),
    ("attention", "out", "kernel"): ("self_attn.o_proj.weight", 2),
    ("mlp", "wi_0", "kernel"): ("mlp.gate_proj.weight", 1),
    ("mlp", "wi_1", "kernel"): ("mlp.up_proj.weight", 1),
    ("mlp", "wo", "kernel"): ("mlp.down_proj.weight", 1),
    ("pre_attention_norm", "scale"): ("input_layernorm.weight", 0),
    ("pre_mlp_norm", "scale"): ("post_attention_layernorm.weight", 0),
}
_T5_ATTENTION = {("query", "kernel"): ("q.weight", 1), ("key", "kernel"): ("k.weight", 1),
                 ("value", "kernel"): ("v.weight", 1), ("out", "kernel"): ("o.weight", 2)}
_T5_MLP = {(w, "kernel"): (f"DenseReluDense.{w}.weight", 1) for w in ("wi_0", "wi_1", "wo")}
_T5_ENCODER_LAYER = {  # our module -> (HF sublayer prefix, its parameters)
    "pre_attention_norm": ("layer.0.layer_norm", {("scale",): ("weight", 0)}),
    "attention": ("layer.0.SelfAttention", _T5_ATTENTION),
    "pre_mlp_norm": ("layer.1.layer_norm", {("scale",): ("weight", 0)}),
    "mlp": ("layer.1", _T5_MLP),
}
_T5_DECODER_LAYER = {
    "pre_self_attention_norm": ("layer.0.layer_norm", {("scale",): ("weight", 0)}),
    "self_attention": ("layer.0.SelfAttention", _T5_ATTENTION),
    "pre_cross_attention_norm": ("layer.1.layer_norm", {("scale",): ("weight", 0)}),
    "encoder_decoder_attention": ("layer.1.EncDecAttention", _T5_ATTENTION),
    "pre_mlp_norm": ("layer.2.layer_norm", {("scale",): ("weight", 0)}),
    "mlp": ("layer.2", _T5_MLP),
}
# the copies of `shared.weight` HF T5 keeps in each stack (tied, not separate parameters)
_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def hf_model(hf_config: Any, state_dict: Mapping[str, np.ndarray]) -> Any:
    """The transformers model (`hf_config.architectures[0]`, eval mode) holding `state_dict`.

    transformers 5 ties T5's lm_head to `shared` whenever a T5 is built from a config (T5Config
    forces `tie_word_embeddings=True`), so loading an untied state dict into such a model would
    write both into one tensor; the head is untied first. (`from_pretrained` of a folder written by
    hf_export unties them itself.)"""
    import torch
    import transformers

    model = getattr(transformers, hf_config.architectures[0])(hf_config)
    head = getattr(model, "lm_head", None)
    if "lm_head.weight" in state_dict and head is not None and (
            head.weight is model.get_input_embeddings().weight):
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=False)
    missing = set(missing) - set(_TIED_COPIES) - {"lm_head.weight"} - {
        k for k in missing if k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise ValueError(f"state dict does not fit {type(model).__name__}: missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    return model.eval()


# ---- the generic part: unrolled flat params <-> state dict ----------------------------------
def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> Params:
    tree: Params = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _to_hf(params: Params, names: Names) -> StateDict:
    flat = {p: np.asarray(v, np.float32) for p, v in _flatten(params).items()}
    unknown = sorted(set(flat) - set(names))
    if unknown:
        raise ValueError(f"no HF name for parameter(s) {['/'.join(p) for p in unknown[:5]]}")
    out = {}
    for path, (hf_name, n_in, factor) in names.items():
        x = flat[path]
        if n_in:
            x = x.reshape(math.prod(x.shape[:n_in]), -1).T
        out[hf_name] = np.ascontiguousarray(x * np.float32(factor) if factor != 1.0 else x)
    return out


def _from_hf(state_dict: Mapping[str, Any], names: Names, shapes: Mapping[tuple[str, ...], tuple],
             ignored: tuple[str, ...] = ()) -> Params:
    """Our params (shapes from the module) from `state_dict`; every HF key must be used."""
    used = {hf for hf, _, _ in names.values()}
    unused = sorted(k for k in state_dict if k not in used and k not in ignored
                    and not k.endswith("rotary_emb.inv_freq"))
    missing = sorted(hf for hf in used if hf not in state_dict)
    if unused or missing:
        raise ValueError(f"the HF weights do not match this architecture: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unused)} without a "
                         f"zhchat counterpart (e.g. {unused[:3]}; biases are not supported)")
    flat = {}
    for path, shape in shapes.items():
        hf_name, n_in, factor = names[path]
        x = _numpy(state_dict[hf_name])
        expected = (math.prod(shape[n_in:]), math.prod(shape[:n_in])) if n_in else shape
        if x.shape != tuple(expected):
            raise ValueError(f"{hf_name}: shape {x.shape}, expected {tuple(expected)} for "
                             f"{'/'.join(path)} {shape} (config and weights disagree?)")
        x = (x.T if n_in else x).reshape(shape)
        flat[path] = x / np.float32(factor) if factor != 1.0 else x
    return _unflatten(flat)


def _numpy(x: Any) -> np.ndarray:
    """fp32 numpy of a numpy array or a torch tensor (bf16 included)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)


def _abstract_shapes(model: Any) -> dict[tuple[str, ...], tuple]:
    import flax.linen as nn

    return {p: tuple(x.shape) for p, x in _flatten(nn.unbox(model.abstract_params())).items()}


def _stack_layers(params: Params, stacks_: Mapping[str, int]) -> Params:
    """Inverse of `stacks.split_stacks` on plain parameter dicts."""
    import jax

    out = dict(params)
    for name, n in stacks_.items():
        layers = [out.pop(f"{name}_{i}") for i in range(n)]
        out[name] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return out


def _layer(names: Names, prefix: tuple[str, ...], hf_prefix: str,
           table: Mapping[tuple[str, ...], tuple[str, int]]) -> None:
    for path, (hf, n_in) in table.items():
        names[prefix + path] = (f"{hf_prefix}.{hf}", n_in, 1.0)


# ---- decoder <-> Llama ----------------------------------------------------------------------
def _decoder_names(cfg: DecoderConfig) -> Names:
    names: Names = {("token_embedder", "embedding"): ("model.embed_tokens.weight", 0, 1.0),
                     ("decoder_norm", "scale"): ("model.norm.weight", 0, 1.0)}
    if not cfg.tie_embeddings:
        names[("logits_dense", "kernel")] = ("lm_head.weight", 1, 1.0)
    for i in range(cfg.num_layers):
        _layer(names, (f"layers_{i}",), f"model.layers.{i}", _DECODER_LAYER)
    return names


def llama_config(cfg: DecoderConfig) -> Any:
    """The `transformers.LlamaConfig` of a zhchat decoder (fp32 weights, eos 1, no BOS).

    No `pad_token_id`: id 0 is pad and also every document's first decoder input (seqio shifts
    targets right with 0), and HF would make it `padding_idx`, a row fine-tuning never updates.
    hf_export puts pad 0 in generation_config.json and the tokenizer instead."""
    import transformers

    if cfg.emb_dim % cfg.num_heads:
        raise ValueError(f"HF Llama needs emb_dim ({cfg.emb_dim}) divisible by num_heads "
                         f"({cfg.num_heads})")
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        pad_token_id=None, eos_token_id=1, bos_token_id=None, dtype="float32",
        architectures=["LlamaForCausalLM"])


def decoder_to_hf(params: Params, cfg: DecoderConfig) -> StateDict:
    """HF LlamaForCausalLM state dict (fp32 numpy) of decoder `params` (unrolled or scanned)."""
    if cfg.scan_layers:
        params = stacks.split_stacks(params, {"layers": cfg.num_layers})
    return _to_hf(params, _decoder_names(cfg))


def decoder_from_hf(state_dict: Mapping[str, Any], hf_config: Any, *, dtype: str = "float32",
                    scan_layers: bool = False) -> tuple[Params, DecoderConfig]:
    """(decoder params, DecoderConfig) of a LlamaForCausalLM state dict and config."""
    from zhchat.models.decoder_model import DecoderOnlyModel

    get = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
    rope = get("rope_parameters") or {"rope_type": "default",
                                      "rope_theta": get("rope_theta", 10000.0)}
    checks = {"hidden_act": get("hidden_act") == "silu",
              "attention_bias": not get("attention_bias"), "mlp_bias": not get("mlp_bias")}
    problems = [f"{k}={get(k)!r}" for k, ok in checks.items() if not ok]
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r}")
    if problems:
        raise ValueError(f"HF Llama config not convertible to zhchat's decoder: {problems}")
    state_dict = dict(state_dict)
    # tied: one array, stored under either name; a stored lm_head that differs stays untied
    # (as HF loads it)
    head, embed = state_dict.get("lm_head.weight"), state_dict.get("model.embed_tokens.weight")
    tied = bool(get("tie_word_embeddings")) and (
        head is None or embed is None or np.array_equal(_numpy(head), _numpy(embed)))
    if tied and head is not None:
        state_dict.pop("lm_head.weight")
        state_dict.setdefault("model.embed_tokens.weight", head)
    cfg = DecoderConfig(
        vocab_size=get("vocab_size"), emb_dim=get("hidden_size"),
        num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
        num_kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
        head_dim=get("head_dim") or get("hidden_size") // get("num_attention_heads"),
        mlp_dim=get("intermediate_size"), tie_embeddings=tied,
        dtype=dtype, norm_eps=float(get("rms_norm_eps")), rope_theta=float(rope["rope_theta"]),
        max_len=get("max_position_embeddings"), scan_layers=False)
    params = _from_hf(state_dict, _decoder_names(cfg),
                      _abstract_shapes(DecoderOnlyModel(config=cfg)))
    if scan_layers:
        params = _stack_layers(params, {"layers": cfg.num_layers})
    return params, dataclasses.replace(cfg, scan_layers=scan_layers)


# ---- T5 <-> T5ForConditionalGeneration ------------------------------------------------------
def _t5_names(cfg: T5Config, *, lm_head: str = "lm_head.weight", lm_scale: float = 1.0) -> Names:
    names: Names = {
        ("token_embedder", "embedding"): ("shared.weight", 0, 1.0),
        ("encoder_relpos", "rel_embedding"): (
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 1, 1.0),
        ("decoder_relpos", "rel_embedding"): (
            "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 1, 1.0),
        ("encoder_norm", "scale"): ("encoder.final_layer_norm.weight", 0, 1.0),
        ("decoder_norm", "scale"): ("decoder.final_layer_norm.weight", 0, 1.0),
        ("logits_dense", "kernel"): (lm_head, 1, lm_scale),
    }
    for stack, n, table in (("encoder", cfg.num_encoder_layers, _T5_ENCODER_LAYER),
                            ("decoder", cfg.num_decoder_layers, _T5_DECODER_LAYER)):
        for i in range(n):
            for module, (hf_sub, params) in table.items():
                _layer(names, (f"{stack}_{i}", module), f"{stack}.block.{i}.{hf_sub}", params)
    return names


def _t5_norm_eps() -> float:
    from zhchat.models import layers
    return float(layers.RMSNorm.epsilon)  # models/t5.py builds its norms with the default


def t5_config(cfg: T5Config) -> Any:
    """The `transformers.T5Config` of a zhchat T5 v1.1 (gated-GELU, untied and unscaled output)."""
    import transformers

    return transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff,
        num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relpos_buckets,
        relative_attention_max_distance=cfg.relpos_max_distance, dropout_rate=cfg.dropout_rate,
        layer_norm_epsilon=_t5_norm_eps(), feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        dtype="float32", architectures=["T5ForConditionalGeneration"])


def t5_to_hf(params: Params, cfg: T5Config) -> StateDict:
    """HF T5ForConditionalGeneration state dict (fp32 numpy; `shared.weight` once, no tied
    `*.embed_tokens.weight` copies) of T5 `params` (unrolled or scanned)."""
    if cfg.scan_layers:
        params = stacks.split_stacks(params, {"encoder": cfg.num_encoder_layers,
                                              "decoder": cfg.num_decoder_layers})
    return _to_hf(params, _t5_names(cfg))


def t5_from_hf(state_dict: Mapping[str, Any], hf_config: Any, *, dtype: str = "float32",
               scan_layers: bool = False) -> tuple[Params, T5Config]:
    """(T5 params, T5Config) of a T5ForConditionalGeneration state dict and config."""
    from zhchat.models.encdec_model import EncoderDecoderModel

    get = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
    problems = []
    if not get("is_gated_act") or get("dense_act_fn") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"feed_forward_proj={get('feed_forward_proj')!r} (zhchat's T5 is "
                        "T5 v1.1 'gated-gelu')")
    if not math.isclose(get("layer_norm_epsilon"), _t5_norm_eps(), rel_tol=1e-9):
        problems.append(f"layer_norm_epsilon={get('layer_norm_epsilon')} (zhchat uses "
                        f"{_t5_norm_eps()})")
    if problems:
        raise ValueError(f"HF T5 config not convertible to zhchat's T5: {problems}")
    cfg = T5Config(
        vocab_size=get("vocab_size"), d_model=get("d_model"), num_heads=get("num_heads"),
        head_dim=get("d_kv"), d_ff=get("d_ff"), num_encoder_layers=get("num_layers"),
        num_decoder_layers=get("num_decoder_layers") or get("num_layers"),
        relpos_buckets=get("relative_attention_num_buckets"),
        relpos_max_distance=get("relative_attention_max_distance"),
        dropout_rate=float(get("dropout_rate", 0.0)), dtype=dtype, scan_layers=False)
    state_dict = {k: v for k, v in state_dict.items() if k not in _TIED_COPIES}
    # transformers 5 reports every T5 as tied and keeps an untied lm_head when the checkpoint
    # has one; the original (tied) T5 scales the decoder output by d_model**-0.5 instead
    scaled = get("scale_decoder_outputs", get("tie_word_embeddings"))
    untied = "lm_head.weight" in state_dict and not (
        scaled and np.array_equal(_numpy(state_dict["lm_head.weight"]),
                                  _numpy(state_dict["shared.weight"])))
    if not untied:
        state_dict.pop("lm_head.weight", None)
    names = _t5_names(cfg, lm_head="lm_head.weight" if untied else "shared.weight",
                      lm_scale=cfg.d_model ** 0.5 if scaled else 1.0)
    params = _from_hf(state_dict, names, _abstract_shapes(EncoderDecoderModel(config=cfg)),
                      ignored=("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias"
                               ".weight",))
    if scan_layers:
        params = _stack_layers(params, {"encoder": cfg.num_encoder_layers,
                                        "decoder": cfg.num_decoder_layers})
    return params, dataclasses.replace(cfg, scan_layers=scan_layers)
