"""``python -m pngrow`` is the ``pngrow`` command."""

from __future__ import annotations

import sys

from pngrow.pipeline.cli import main

sys.exit(main())
