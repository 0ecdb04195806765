"""One process of a multi-controller CPU training job (run by test_multiprocess.py).

argv: process_id num_processes coordinator_port run_dir num_steps. Prints one RESULT json line.
"""

import json
import os
import pathlib
import sys

pid, num, port, run_dir, steps = sys.argv[1:6]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // int(num)}"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=int(num),
                           process_id=int(pid))
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from conftest import tiny_decoder  # noqa: E402
from zhchat.trainer import optimizers, partitioning, synthetic_data, train  # noqa: E402

summary = train.train(
    model=tiny_decoder(),
    train_data=lambda **kw: synthetic_data.make_synthetic_iterator(seq_len=16, vocab_size=64,
                                                                   **kw),
    partitioner=partitioning.Partitioner(mesh_shape=(2, 2, 2)),
    optimizer=optimizers.make_optimizer(learning_rate=1e-2), num_steps=int(steps), batch_size=8,
    log_every=1, checkpoint_every=2, run_dir=run_dir, progress_bar=False)
print("RESULT " + json.dumps({
    "process": jax.process_index(), "devices": jax.device_count(),
    "local_devices": jax.local_device_count(), "step": summary["step"],
    "history": [[h["step"], h["loss"]] for h in summary["history"]]}), flush=True)
jax.distributed.shutdown()
