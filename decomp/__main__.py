"""``python -m decomp``: write the response decomposition of a pretrained backbone (see ``decomp.cli``)."""

import sys

from rcm_nddr.commands.decomp import main

sys.exit(main())
