import sys

from dlmjax.cli import main

sys.exit(main())
