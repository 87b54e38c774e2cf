import sys

from streamdet.cli import main

sys.exit(main())
