import sys

from fedfms.cli import main

sys.exit(main())
