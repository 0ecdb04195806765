"""`python -m zhchat.scripts.pipeline`: see the package docstring."""

import sys

from zhchat.scripts.pipeline.cli import main

sys.exit(main())
