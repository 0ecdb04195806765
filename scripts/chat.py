"""Multi-turn chat with a trained checkpoint in the shared chat template (tasks/chat_template.py).

Interactive (reads turns from stdin; the decoder streams its reply piece by piece):
    python -m zhchat.scripts.chat --run_dir=runs/sft --vocab=out/spm.model \
        [--system="你是一个乐于助人的助手。"] [--temperature=0.7 --top_k=0 --top_p=0.9 --max_new_tokens=256]
  commands: /reset (forget the history), /quit (or end of input), /help
Batch (one JSON object per line, {"messages": [...]} or {"prompt": "..."}, optional "system"):
    python -m zhchat.scripts.chat --run_dir=... --vocab=... --batch_input=in.jsonl --batch_output=out.jsonl

The model is rebuilt from `<run_dir>/config.gin` (or `--gin_file`/`--gin.KEY=VALUE`) and only the
parameters are restored (trainer.checkpoints.restore_params): a checkpoint of another architecture or
vocabulary size fails with a message saying so. Long histories are truncated from the left at turn
boundaries to fit the model's context. The encoder-decoder answers whole replies (no streaming).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Iterator, TextIO


from zhchat.tasks import chat_template as ct

HELP = "commands: /reset forgets the history, /quit exits, /help shows this"


class ChatSession:
    """A model, its params and a vocabulary; `reply(messages)` streams the next assistant reply."""

    def __init__(self, model: Any, params: Any, vocab: Any, *, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_k: int = 0, top_p: float = 0.9, seed: int = 0,
                 max_context: int | None = None):
        import jax

        from zhchat.models import streaming
        from zhchat.models.decoder_model import DecoderOnlyModel
        self.model, self.params, self.vocab = model, params, vocab
        self.is_decoder = isinstance(model, DecoderOnlyModel)
        model_vocab = model.config.vocab_size
        if model_vocab < vocab.vocab_size:
            raise ValueError(f"the model's vocabulary ({model_vocab}) is smaller than the tokenizer "
                             f"{vocab.path} ({vocab.vocab_size}): checkpoint and tokenizer differ")
        self.max_new_tokens = max_new_tokens
        limit = getattr(model.config, "max_len", None) or 512
        self.max_context = min(max_context or limit, limit)
        if self.max_context <= max_new_tokens + 8:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a "
                             f"context of {self.max_context}")
        self.rng = jax.random.key(seed)
        self.stops = {vocab.im_end_id, vocab.eos_id}
        if not self.is_decoder:
            self.stops.add(vocab.pad_id)  # a T5 pads after its EOS
        self.streamer = streaming.TokenStreamer(model, temperature=temperature, top_k=top_k,
                                                top_p=top_p)

    def _prompt(self, messages: list[dict]) -> list[int]:
        budget = self.max_context - self.max_new_tokens
        if self.is_decoder:
            return ct.encode_prompt(self.vocab, messages, max_len=budget)
        return ct.encode_prompt(self.vocab, messages, max_len=budget - 1) + [self.vocab.eos_id]

    def stream(self, messages: list[dict]) -> Iterator[int]:
        """Token ids of the next assistant reply, one at a time (the stop token not included)."""
        import jax
        self.rng, rng = jax.random.split(self.rng)
        yield from self.streamer.stream(self.params, self._prompt(messages), rng,
                                        max_new_tokens=self.max_new_tokens,
                                        stop_ids=sorted(self.stops))

    def reply(self, messages: list[dict], out: TextIO | None = None) -> str:
        """The whole reply text; with `out`, new text is written (and flushed) as it is decoded."""
        ids: list[int] = []
        shown = ""
        for tok in self.stream(messages):
            ids.append(tok)
            text = self._text(ids)
            if out is not None and not text.endswith("\ufffd") and len(text) > len(shown):
                out.write(text[len(shown):])
                out.flush()
                shown = text
        text = self._text(ids)
        if out is not None and len(text) > len(shown):
            out.write(text[len(shown):])
        return ct.reply_text(text)

    def _text(self, ids: list[int]) -> str:
        return self.vocab.decode([self.vocab.im_end_id] + ids)[len(ct.IM_END):]


def clean_user_text(text: str) -> str:
    """User input may not forge turns: chat tokens are removed from it."""
    return text.replace(ct.IM_START, "").replace(ct.IM_END, "")


def interactive(session: ChatSession, stdin: TextIO, stdout: TextIO, system: str | None) -> int:
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    print(f"zhchat — {HELP}", file=stdout)
    while True:
        stdout.write("用户> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return 0
        text = clean_user_text(line.rstrip("\n")).strip()
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            messages = list(base)
            print("(history cleared)", file=stdout)
            continue
        if text == "/help" or not text:
            print(HELP, file=stdout)
            continue
        messages.append({"role": "user", "content": text})
        stdout.write("助手> ")
        reply = session.reply(messages, out=stdout)
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": reply})


def batch(session: ChatSession, input_path: str, output_path: str) -> tuple[int, int]:
    """jsonl in -> jsonl out; returns (answered, skipped). Bad lines are reported, not fatal."""
    done = skipped = 0
    with open(input_path, encoding="utf-8") as fin, open(output_path, "w", encoding="utf-8") as fout:
        for lineno, line in enumerate(fin, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
                if record.get("system"):
                    messages = [{"role": "system", "content": record["system"]}] + messages
                ct.validate(messages)
                if messages[-1]["role"] == "assistant":
                    raise ct.ChatFormatError("the last message is already an assistant reply")
                reply = session.reply(messages)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError,
                    ct.ChatFormatError) as e:
                print(f"{input_path}:{lineno}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
                skipped += 1
                continue
            out = {"id": record.get("id", lineno), "messages": messages, "reply": reply}
            fout.write(json.dumps(out, ensure_ascii=False) + "\n")
            done += 1
    return done, skipped


def load_session(args: argparse.Namespace, gin_files: list[str], bindings: list[str]) -> ChatSession:
    """The run's model (its config.gin or the given gin files) with the latest checkpoint's params."""
    from zhchat.scripts.infer import load
    from zhchat.tasks.vocabulary import Vocabulary

    model, params, step = load(args.run_dir, None, gin_files, bindings, None)
    print(f"loaded {args.run_dir} step {step}", file=sys.stderr)
    return ChatSession(model, params, Vocabulary(args.vocab), max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, max_context=args.max_context)


def main(argv: list[str] | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None) -> int:
    from zhchat.gin_configs import cli as gin_cli
    gin_files, bindings, rest = gin_cli.split_gin_args(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m zhchat.scripts.chat", description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", required=True)
    p.add_argument("--vocab", required=True, help="the SentencePiece model the run was trained with")
    p.add_argument("--system", default=None, help="system message opening every dialogue")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--max_context", type=int, default=None, help="default: the model's max_len")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_input", default=None)
    p.add_argument("--batch_output", default=None)
    args = p.parse_args(rest)
    if bool(args.batch_input) != bool(args.batch_output):
        p.error("--batch_input and --batch_output go together")
    try:
        session = load_session(args, gin_files, bindings)
    except (FileNotFoundError, ValueError, gin_cli.GinConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.batch_input:
        done, skipped = batch(session, args.batch_input, args.batch_output)
        print(f"wrote {done} replies to {args.batch_output} ({skipped} lines skipped)", file=sys.stderr)
        return 0
    return interactive(session, stdin or sys.stdin, stdout or sys.stdout, args.system)


if __name__ == "__main__":
    sys.exit(main())
