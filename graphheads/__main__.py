import sys

from graphheads.cli import main

sys.exit(main())
