"""`python -m ardeploy.cli ...`, the same as the `ardeploy` command."""
import sys

from ardeploy.cli import main

sys.exit(main())
