"""``python -m qlora_rs.cli``: the same as the ``qlora-rs`` command."""

import sys

from .app import main

sys.exit(main())
