import sys

from saelab.cli.main import main

sys.exit(main())
