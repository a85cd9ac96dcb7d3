"""`python -m onnxtq`."""

import sys

from onnxtq.cli import main

sys.exit(main())
