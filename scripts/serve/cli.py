"""`python -m zhchat.scripts.serve`: load a run, build the engine, serve the app with uvicorn.

    python -m zhchat.scripts.serve --run_dir=runs/sft --vocab=out/spm.model \\
        [--host=127.0.0.1 --port=8000 --max_batch=8 --max_queue=256 --timeout_s=600 \\
         --max_new_tokens=256 --max_context=N --cache_margin=N --model_name=NAME --step=N \\
         --warmup=light|full|none] \\
        [--gin_file=F ... --gin.KEY=VALUE ...]

The model is rebuilt from `<run_dir>/config.gin` (or the given gin files and bindings, as
scripts/chat.py takes them) and only the parameters are restored, onto one device. Binds
127.0.0.1 unless --host says otherwise. docs/serving.md describes the endpoints and limits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any, Sequence

log = logging.getLogger("zhchat.serve")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    """(args, gin files, gin bindings); raises GinConfigError for a malformed gin argument."""
    from zhchat.gin_configs import cli as gin_cli

    gin_files, bindings, rest = gin_cli.split_gin_args(argv)
    p = argparse.ArgumentParser(prog="python -m zhchat.scripts.serve",
                                description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", required=True, help="a training run (config.gin + checkpoints/)")
    p.add_argument("--vocab", required=True, help="the run's SentencePiece model")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model_name", default=None, help="the served model id (default: the run "
                   "directory's name)")
    p.add_argument("--max_batch", type=int, default=8, help="rows decoded together")
    p.add_argument("--max_queue", type=int, default=256, help="waiting requests before 503")
    p.add_argument("--timeout_s", type=float, default=600.0, help="per request, from arrival")
    p.add_argument("--max_new_tokens", type=int, default=256,
                   help="the largest (and default) max_tokens of a request")
    p.add_argument("--max_context", type=int, default=None,
                   help="prompt + max_tokens limit (default: the decoder's max_len; 512 for a T5)")
    p.add_argument("--cache_margin", type=int, default=None,
                   help="decoder cache slots beyond the context (default: half the context): "
                   "more memory, rarer compaction")
    p.add_argument("--warmup", choices=("light", "full", "none"), default="light",
                   help="light: compile batch 1 and a full batch of short prompts; full: every "
                   "batch and width bucket (slow on big models); none: compile on first use")
    p.add_argument("--log_level", default="info")
    return p.parse_args(rest), gin_files, bindings


def load_model(run_dir: str, gin_files: Sequence[str], bindings: Sequence[str],
               step: int | None = None) -> tuple[Any, Any, int]:
    """(model, params on one device, step) from the run's config.gin (or `gin_files`) and its
    latest (or `step`) checkpoint's parameters."""
    import gin
    import jax

    from zhchat.gin_configs import cli as gin_cli
    from zhchat.trainer import checkpoints, partitioning

    files = list(gin_files) or [os.path.join(run_dir, "config.gin")]
    if not gin_files and not os.path.isfile(files[0]):
        raise FileNotFoundError(f"{files[0]} not found: pass --gin_file=<model preset> and the "
                                "bindings the run used")
    gin.clear_config()
    try:
        gin_cli.parse_gin(files, bindings)
        model = gin_cli.evaluate_macro("MODEL")
    finally:
        gin.clear_config()
    one = partitioning.Partitioner(num_devices=1, mesh_shape=(1, 1, 1))
    params, restored = checkpoints.restore_params(os.path.join(run_dir, "checkpoints"), model,
                                                  one, jax.random.key(0), step=step)
    return model, params, restored


def build(args: argparse.Namespace, gin_files: Sequence[str], bindings: Sequence[str]
          ) -> tuple[Any, Any, str]:
    """(engine, vocabulary, model name) for parsed arguments; the engine is not started."""
    from zhchat.scripts.serve.engine import make_engine
    from zhchat.tasks.vocabulary import Vocabulary

    vocab = Vocabulary(args.vocab)
    model, params, step = load_model(args.run_dir, gin_files, bindings, args.step)
    log.info("loaded %s step %d", args.run_dir, step)
    engine = make_engine(model, params, vocab, max_batch=args.max_batch, max_queue=args.max_queue,
                         context=args.max_context, margin=args.cache_margin)
    if args.max_new_tokens < 1 or args.max_new_tokens >= engine.context:
        raise ValueError(f"--max_new_tokens={args.max_new_tokens} must be in [1, "
                         f"{engine.context}) (the context)")
    name = args.model_name or os.path.basename(os.path.normpath(args.run_dir))
    return engine, vocab, name


def warmup(engine: Any, vocab: Any) -> None:
    """Compiles the common shapes before serving: one request alone (batch 1), then a full
    batch of short prompts (other widths and batch sizes compile on first use)."""
    from zhchat.tasks import chat_template as ct

    prompt = ct.encode_prompt(vocab, [{"role": "user", "content": "你好"}])
    if engine.encoder_decoder:
        prompt = prompt + [vocab.eos_id]

    async def run(n: int) -> None:
        handles = [engine.submit(prompt, max_tokens=2, ignore_eos=True) for _ in range(n)]
        for h in handles:
            while not hasattr(await h.queue.get(), "reason"):
                pass

    asyncio.run(run(1))
    asyncio.run(run(engine.backend.max_batch))


def serve(engine: Any, vocab: Any, *, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          max_new_tokens: int = 256, timeout_s: float = 600.0, log_level: str = "info") -> None:
    """Runs the app until interrupted (the engine must be started)."""
    import uvicorn

    from zhchat.scripts.serve.app import make_app

    app = make_app(engine, vocab, model_name=model_name, max_new_tokens=max_new_tokens,
                   timeout_s=timeout_s)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                  access_log=False)).run()


def main(argv: list[str] | None = None) -> int:
    from zhchat.gin_configs import cli as gin_cli

    try:
        args, gin_files, bindings = parse_args(sys.argv[1:] if argv is None else argv)
    except gin_cli.GinConfigError as e:
        print(f"serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine, vocab, name = build(args, gin_files, bindings)
    except (FileNotFoundError, ValueError, gin_cli.GinConfigError) as e:
        print(f"serve: {e}", file=sys.stderr)
        return 2
    engine.start()
    try:
        if args.warmup == "full":
            engine.backend.precompile()
        if args.warmup != "none":
            warmup(engine, vocab)
            log.info("warm: compiled %s", sorted(engine.backend.shapes))
        log.info("serving %s on http://%s:%d/v1 (max_batch=%d, context=%d)", name, args.host,
                 args.port, args.max_batch, engine.context)
        serve(engine, vocab, model_name=name, host=args.host, port=args.port,
              max_new_tokens=args.max_new_tokens, timeout_s=args.timeout_s,
              log_level=args.log_level)
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
