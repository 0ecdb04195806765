"""Export a zhchat run as a HF transformers model folder (weights, config, tokenizer).

    python -m zhchat.scripts.hf_export --run_dir=runs/demo/pretrain/run --vocab=runs/demo/vocab/spm.model \
        --out=hf/decoder [--step=N] [--overwrite]

The model comes from `<run_dir>/config.gin`, the parameters from the latest (or `--step`)
checkpoint under `<run_dir>/checkpoints`. A decoder becomes `LlamaForCausalLM`, a T5 v1.1
`T5ForConditionalGeneration`; the folder holds config.json, generation_config.json,
model.safetensors (fp32) and the tokenizer (tokenizer.json + tokenizer_config.json +
special_tokens_map.json, ids identical to zhchat's Vocabulary). Load it with
`transformers.AutoModelForCausalLM` / `AutoModelForSeq2SeqLM` and `AutoTokenizer`, offline.
Mappings: scripts/hf_convert.py; what converts and what does not: docs/architecture.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping

import numpy as np

WEIGHTS = "model.safetensors"


def save_hf(out_dir: str, hf_config: Any, state_dict: Mapping[str, np.ndarray], *,
            generation: Mapping[str, Any] | None = None) -> None:
    """Writes config.json, model.safetensors (every array as given, fp32) and, with
    `generation`, generation_config.json into `out_dir`."""
    import transformers
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    hf_config.save_pretrained(out_dir)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()},
              os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
    if generation:
        transformers.GenerationConfig(**generation).save_pretrained(out_dir)


def architecture(model: Any) -> str:
    """The HF class a zhchat model wrapper exports as."""
    from zhchat.models.decoder_model import DecoderOnlyModel
    from zhchat.models.encdec_model import EncoderDecoderModel

    if isinstance(model, DecoderOnlyModel):
        return "LlamaForCausalLM"
    if isinstance(model, EncoderDecoderModel):
        return "T5ForConditionalGeneration"
    raise ValueError(f"unknown architecture {type(model).__name__}: hf_export converts "
                     "DecoderOnlyModel (-> LlamaForCausalLM) and EncoderDecoderModel "
                     "(-> T5ForConditionalGeneration)")


def convert(model: Any, params: Any) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """(HF config, HF state dict, generation settings) of a zhchat model wrapper and its params."""
    from zhchat.scripts import hf_convert

    generation = {"pad_token_id": model.pad_id, "eos_token_id": model.eos_id}
    if architecture(model) == "LlamaForCausalLM":
        return (hf_convert.llama_config(model.config),
                hf_convert.decoder_to_hf(params, model.config), generation)
    return (hf_convert.t5_config(model.config), hf_convert.t5_to_hf(params, model.config),
            {**generation, "decoder_start_token_id": 0})


def _chat_stop_ids(spm_model_path: str) -> list[int]:
    from zhchat.scripts.hf_tokenizer import load_model_proto

    return [i for i, p in enumerate(load_model_proto(spm_model_path).pieces)
            if p.piece == "<|im_end|>"]


def export_run(run_dir: str, vocab: str, out_dir: str, *, step: int | None = None,
               overwrite: bool = False, extra_ids: int = 100) -> dict[str, Any]:
    """Writes the HF folder of a run; returns {"architecture", "step", "out_dir"}. Paths, the
    architecture and the vocabulary size are checked before the checkpoint is read."""
    import gin
    import jax

    from zhchat.scripts import hf_tokenizer
    from zhchat.trainer import checkpoints as ckpt_lib
    from zhchat.gin_configs import cli as gin_cli
    from zhchat.trainer import partitioning

    config, ckpt_dir = os.path.join(run_dir, "config.gin"), os.path.join(run_dir, "checkpoints")
    for path, what in ((run_dir, "run directory"), (config, "run config"),
                       (ckpt_dir, "checkpoints folder"), (vocab, "SentencePiece model")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{what} {path} not found")
    if os.path.exists(os.path.join(out_dir, WEIGHTS)) and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {WEIGHTS} (pass --overwrite to replace it)")
    num_ids = hf_tokenizer.vocab_size(vocab, extra_ids=extra_ids)
    gin.clear_config()
    try:
        gin_cli.parse_gin([config], [])
        model = gin_cli.evaluate_macro("MODEL")
    finally:
        gin.clear_config()
    arch = architecture(model)
    if model.config.vocab_size < num_ids:
        raise ValueError(f"vocab size mismatch: {vocab} has {num_ids} ids (with {extra_ids} "
                         f"sentinels), the model's embedding {model.config.vocab_size}")
    params, restored = ckpt_lib.restore_params(ckpt_dir, model, partitioning.Partitioner(),
                                               jax.random.key(0), step=step)
    hf_config, state_dict, generation = convert(model, jax.device_get(params))
    stops = _chat_stop_ids(vocab)
    if stops and arch == "LlamaForCausalLM":  # a chat model's reply ends at <|im_end|>
        generation["eos_token_id"] = [generation["eos_token_id"]] + stops
    save_hf(out_dir, hf_config, state_dict, generation=generation)
    hf_tokenizer.export_tokenizer(vocab, out_dir, extra_ids=extra_ids,
                                  model_max_length=getattr(model.config, "max_len", None))
    return {"architecture": arch, "step": restored, "out_dir": out_dir}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zhchat.scripts.hf_export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True, help="training run (config.gin + checkpoints/)")
    p.add_argument("--vocab", required=True, help="the run's SentencePiece model")
    p.add_argument("--out", required=True, help="HF folder to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from zhchat.gin_configs.cli import GinConfigError
    try:
        summary = export_run(args.run_dir, args.vocab, args.out, step=args.step,
                             overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, GinConfigError) as e:
        print(f"hf_export: {e}", file=sys.stderr)
        return 2
    print(f"hf_export: wrote {summary['architecture']} (step {summary['step']}) to "
          f"{summary['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
