import sys

from qscale.coordinator.cli import main

if __name__ == "__main__":
    sys.exit(main())
