import sys

from rcm_nddr.commands.cli import main

sys.exit(main())
