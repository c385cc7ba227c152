"""`python -m broker`: the same CLI as the `token-broker` console script."""

import sys

from broker.cli import main

sys.exit(main())
