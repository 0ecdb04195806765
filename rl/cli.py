"""RL stages from gin files: `python -m zhchat.rl.cli {reward,dpo,ppo} --gin_file=... --gin.X=Y`.

reward / dpo: optionally write a step-0 checkpoint of RL_MODEL whose (backbone) parameters come
from the SFT checkpoint `rl_stage.init_checkpoint` (rl/warm_start.py), then run trainer.train
(gin's `train`, model %RL_MODEL). ppo: run rl/ppo.py's `train_ppo`. Parameters of frozen models
(reference, reward) are read with `load_params` (trainer/checkpoints.restore_params).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import gin

from zhchat.gin_configs import cli as gin_cli
from zhchat.trainer import checkpoints as ckpt_lib
from zhchat.trainer import optimizers, partitioning, state_init

if __name__ == "__main__":  # run the importable module so gin registers the configurables once
    from zhchat.rl.cli import console_main
    console_main()

_SHAPES = {"decoder_input_tokens": (1, 8), "encoder_input_tokens": (1, 8)}


@gin.configurable
def load_params(*, directory: str = gin.REQUIRED, model: Any = gin.REQUIRED,
                partitioner: partitioning.Partitioner | None = None, step: int | None = None,
                under: tuple[str, ...] = ()) -> Any:
    """The parameters of `model` from a trainer checkpoint directory (latest step by default),
    sharded by the partitioner's rules. Safe inside an active partitioner (trainer data factories
    run there): the boxed shapes are read without `nn.unbox`, which would apply constraints."""
    partitioner = partitioner or partitioning.Partitioner()
    abstract = state_init.abstract_params(model, partitioner, _SHAPES)
    params, _ = ckpt_lib.restore_params_only(directory, abstract, step, under=under)
    return params


@gin.configurable
def rl_stage(*, init_checkpoint: str | None = None, init_subtree: str | None = None,
             run_dir: str = gin.REQUIRED, seed: int = 0) -> None:
    """Warm-starts `run_dir` from `init_checkpoint` (an SFT run's checkpoints folder) unless the run
    already has checkpoints (then trainer.train resumes it)."""
    if not init_checkpoint or os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return
    from zhchat.rl import warm_start
    model = gin_cli.evaluate_macro("RL_MODEL")
    backbone = getattr(model, "backbone", None) or getattr(model, "policy")
    partitioner = partitioning.Partitioner()
    params = load_params(directory=init_checkpoint, model=backbone, partitioner=partitioner)
    warm_start.warm_start(run_dir, model, params, optimizer=optimizers.make_optimizer(),
                          partitioner=partitioner, batch_shapes=_SHAPES, subtree=init_subtree,
                          seed=seed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("reward", "dpo", "ppo"):
        print("usage: python -m zhchat.rl.cli {reward,dpo,ppo} --gin_file=F [--gin.X=Y ...]",
              file=sys.stderr)
        return 2
    try:
        files, bindings, rest = gin_cli.split_gin_args(argv[1:])
        if rest:
            raise gin_cli.GinConfigError(f"unknown arguments {rest}")
        gin_cli.parse_gin(files, bindings)
    except gin_cli.GinConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    from zhchat.trainer import faults
    try:
        if argv[0] == "ppo":
            from zhchat.rl import ppo
            out = ppo.train_ppo()
            print(f"finished PPO at iteration {out['iteration']}", flush=True)
            return 0
        from zhchat.trainer.train import train
        rl_stage()
        summary = train()
    except faults.WRITE_ERRORS:
        faults.exit_after_write_error()
    except FileNotFoundError as e:  # pairs, prompts, a vocabulary or the SFT checkpoint
        print(f"rl: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"finished at step {summary['step']}, loss {summary['loss']:.4f}", flush=True)
    return 0


def console_main() -> None:
    sys.exit(main())
