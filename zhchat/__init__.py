"""zhchat: train Chinese ChatGPT-style models from zero with JAX (T5X-style).

The repository's top-level folders are subpackages of this namespace
(``zhchat.models`` -> ``models/``, ``zhchat.tasks`` -> ``tasks/``, ...), mapped in setup.py.
"""

__version__ = "0.1.0"
