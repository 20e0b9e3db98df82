"""``python -m tucker_attention.cli`` (and ``torchrun ... -m tucker_attention.cli``): the ``tucker-attn`` command."""

import sys

from . import main

sys.exit(main())
