"""rl/ runs on the GPU image, which has no TensorFlow or seqio: importing it must not pull them in."""

import subprocess
import sys

MODULES = ["cli", "dpo", "gae", "heads", "kl_controller", "losses", "pair_builder", "ppo",
           "ppo_step", "reward_model", "rollout", "warm_start"]


def test_rl_imports_no_tensorflow_or_seqio():
    code = ("import sys\n" + "".join(f"import zhchat.rl.{m}\n" for m in MODULES)
            + "bad = [m for m in ('tensorflow', 'seqio', 'tensorflow_datasets') if m in sys.modules]\n"
            + "print(bad)\nassert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
