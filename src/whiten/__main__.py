import sys

from whiten.cli import main

sys.exit(main())
