"""`python -m zhchat.scripts.serve`: see scripts/serve/cli.py."""

import sys

from zhchat.scripts.serve.cli import main

sys.exit(main())
