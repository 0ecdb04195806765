"""Import a HF transformers model folder (Llama or T5 v1.1 weights on disk) as a zhchat run.

    python -m zhchat.scripts.hf_import --hf_dir=hf/decoder --out_run_dir=runs/imported \
        [--vocab=out/spm.model] [--dtype=bfloat16] [--scan_layers]

Reads config.json and model.safetensors (sharded, or pytorch_model.bin) offline, nothing is
downloaded. Writes `<out_run_dir>/config.gin`, a model preset (the DecoderConfig / T5Config
bindings, `VOCAB_SIZE` and `MODEL`), and a params-only checkpoint (step 0) under
`<out_run_dir>/checkpoints` with the project's Checkpointer. zhchat.scripts.infer / chat load it
with `--run_dir=<out_run_dir>`; fine-tuning starts from it with the preset and
`train.init_checkpoint_dir` (runs/sft.gin: `--gin_file=<out_run_dir>/config.gin
--gin.PRETRAINED_DIR="'<out_run_dir>/checkpoints'"`). It holds no optimizer state, so it is not a
run to resume. `--vocab` checks a SentencePiece model against the embedding before converting
(infer/chat need that model: the HF tokenizer is not converted back).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np

ARCHITECTURES = {"llama": "decoder", "t5": "t5"}  # HF model_type -> zhchat model


def _weight_files(hf_dir: str) -> list[str]:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(hf_dir, s) for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(hf_dir, name)):
            return [os.path.join(hf_dir, name)]
    raise FileNotFoundError(f"{hf_dir} has no model.safetensors(.index.json) or pytorch_model.bin")


def load_state_dict(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of the folder's weight files as fp32 numpy (bf16/fp16 upcast)."""
    import torch
    from safetensors import safe_open

    out = {}
    for path in _weight_files(hf_dir):
        if path.endswith(".bin"):
            tensors = torch.load(path, map_location="cpu", weights_only=True)
            out.update({k: v.float().numpy() for k, v in tensors.items()})
            continue
        with safe_open(path, framework="pt") as f:
            out.update({k: f.get_tensor(k).float().numpy() for k in f.keys()})
    return out


def model_gin(cfg: Any, *, source: str) -> str:
    """A model preset (gin) building `cfg`'s model wrapper as MODEL."""
    from zhchat.models.decoder import DecoderConfig

    if isinstance(cfg, DecoderConfig):
        module, name, wrapper = "zhchat.models.decoder_model", "DecoderConfig", "DecoderOnlyModel"
    else:
        module, name, wrapper = "zhchat.models.encdec_model", "T5Config", "EncoderDecoderModel"
    lines = [f"# {wrapper} imported from the HF model {source} by zhchat.scripts.hf_import.",
             f"import {module}", "", f"VOCAB_SIZE = {cfg.vocab_size}"]
    lines += [f"{name}.{f.name} = " + ("%VOCAB_SIZE" if f.name == "vocab_size"
                                       else repr(getattr(cfg, f.name)))
              for f in dataclasses.fields(cfg)]
    lines += ["", f"{wrapper}.config = @{name}()", f"MODEL = @{wrapper}()", ""]
    return "\n".join(lines)


def _check_vocab(hf_dir: str, model_vocab: int, vocab: str | None) -> None:
    from zhchat.scripts import hf_tokenizer

    sizes = {}
    if vocab:
        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"SentencePiece model {vocab} not found")
        sizes[vocab] = hf_tokenizer.vocab_size(vocab)
    tokenizer_json = os.path.join(hf_dir, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        from tokenizers import Tokenizer
        sizes[tokenizer_json] = Tokenizer.from_file(tokenizer_json).get_vocab_size()
    for path, size in sizes.items():
        if size > model_vocab:
            raise ValueError(f"vocab size mismatch: {path} has {size} ids, the model's "
                             f"embedding {model_vocab}")


def import_run(hf_dir: str, out_run_dir: str, *, vocab: str | None = None,
               dtype: str = "float32", scan_layers: bool = False) -> dict[str, Any]:
    """Writes the zhchat run of a HF folder; returns {"model", "config", "run_dir"}. `dtype` is
    the compute dtype (parameters stay fp32). Paths, the architecture and vocabulary sizes are
    checked before any weight is read."""
    import jax
    import jax.numpy as jnp
    import transformers

    from zhchat.scripts import hf_convert
    from zhchat.trainer.checkpoints import Checkpointer

    config_json = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir) or not os.path.isfile(config_json):
        raise FileNotFoundError(f"{config_json} not found: --hf_dir must be a HF model folder")
    _weight_files(hf_dir)
    ckpt_dir = os.path.join(out_run_dir, "checkpoints")
    if os.path.exists(ckpt_dir) and os.listdir(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints: pick a new --out_run_dir")
    with open(config_json, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unknown architecture: model_type {model_type!r} in {config_json}; "
                         f"hf_import converts {sorted(ARCHITECTURES)}")
    hf_config = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    _check_vocab(hf_dir, hf_config.vocab_size, vocab)

    from_hf = (hf_convert.decoder_from_hf if ARCHITECTURES[model_type] == "decoder"
               else hf_convert.t5_from_hf)
    params, cfg = from_hf(load_state_dict(hf_dir), hf_config, dtype=dtype, scan_layers=scan_layers)
    checkpointer = Checkpointer(ckpt_dir, keep=None, async_save=False)
    checkpointer.save(0, {"step": jnp.zeros((), jnp.int32),
                          "params": jax.tree.map(jnp.asarray, params)}, force=True)
    checkpointer.close()
    with open(os.path.join(out_run_dir, "config.gin"), "w", encoding="utf-8") as f:
        f.write(model_gin(cfg, source=os.path.abspath(hf_dir)))
    return {"model": ARCHITECTURES[model_type], "config": cfg, "run_dir": out_run_dir}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zhchat.scripts.hf_import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf_dir", required=True, help="HF model folder (config.json + weights)")
    p.add_argument("--out_run_dir", required=True, help="zhchat run directory to write")
    p.add_argument("--vocab", default=None, help="SentencePiece model to check against the model")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype of the imported model (parameters stay fp32)")
    p.add_argument("--scan_layers", action="store_true", help="scanned layer stacks")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = import_run(args.hf_dir, args.out_run_dir, vocab=args.vocab, dtype=args.dtype,
                             scan_layers=args.scan_layers)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"hf_import: {e}", file=sys.stderr)
        return 2
    print(f"hf_import: wrote the {summary['model']} run {summary['run_dir']} (config.gin + "
          "checkpoints/0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
