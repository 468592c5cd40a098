import sys

from rcm_nddr.commands.cli import main

if __name__ == "__main__":  # not when a spawned process (the demo's lanes) imports the parent's main module
    sys.exit(main())
