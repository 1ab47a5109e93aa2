import sys

from econoserve.cli import main

sys.exit(main())
