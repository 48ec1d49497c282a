"""``python -m llmarch``: the ``llmarch`` command (``llmarch.cli``)."""

import sys

from llmarch.cli import main

sys.exit(main())
