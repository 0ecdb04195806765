import sys

from zhchat.scripts.evaluate.cli import main

sys.exit(main())
