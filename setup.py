"""Packaging for zhchat: the repository's top-level folders become subpackages of `zhchat`.

Exact versions of the whole environment (transitive dependencies included) are in
requirements.lock; install with `pip install -c requirements.lock -e ".[dev]"`.
"""

import setuptools

_SUBPACKAGES = ("tasks", "models", "rl", "scripts", "trainer", "gin_configs", "benchmarks")

_CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "sentencepiece==0.2.1",  # 0.2.3 needs protobuf>=7, which apache-beam caps below 7
    "gin-config==0.5.0",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "numpy==2.4.6",
]
_DATA = [  # SeqIO task definitions, caching and corpus cleaning (TensorFlow side)
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "apache-beam==2.77.0",
    "OpenCC==1.4.2",
]
_HF = ["torch==2.13.0", "transformers==5.23.0"]  # parity tests and the HF baseline benchmark
_PLOT = ["matplotlib==3.11.2"]  # PNG curves (benchmarks/convergence.py, scripts/plot.py)
_SERVE = ["fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.55.0"]  # scripts/serve
_DEV = (["pytest==9.0.3", "pytest-xdist==3.8.0", "datasketch==2.0.0",
         "openai==3.57.0"]  # the official client against our server in tests/scripts
        + _HF + _PLOT + _SERVE)

setuptools.setup(
    name="zhchat",
    version="0.1.0",
    description="Train Chinese ChatGPT-style models from zero with JAX, T5X-style.",
    python_requires=">=3.10",
    packages=["zhchat"] + [f"zhchat.{p}" for p in _SUBPACKAGES]
    + [f"zhchat.{p}" for p in setuptools.find_packages(include=[f"{s}.*" for s in _SUBPACKAGES])],
    package_dir={"zhchat": "zhchat", **{f"zhchat.{p}": p for p in _SUBPACKAGES}},
    package_data={"zhchat.gin_configs": ["**/*.gin"], "zhchat.tasks": ["*.txt"]},
    install_requires=_CORE + _DATA,
    extras_require={"dev": _DEV, "hf": _HF, "plot": _PLOT, "serve": _SERVE},
    entry_points={"console_scripts": ["zhchat-train=zhchat.trainer.cli:console_main"]},
)
