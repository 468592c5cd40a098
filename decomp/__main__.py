"""``python -m decomp``: write the response decomposition of a pretrained backbone (see
``rcm_nddr.commands.decomp``)."""

import sys

from rcm_nddr.commands.cli import decomp_main

sys.exit(decomp_main())
