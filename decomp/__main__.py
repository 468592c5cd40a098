"""``python -m decomp``: write the response decomposition of a pretrained backbone (see ``decomp.cli``)."""

import sys

from decomp.cli import main

sys.exit(main())
