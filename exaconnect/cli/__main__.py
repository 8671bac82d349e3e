import sys

from exaconnect.cli import main

sys.exit(main())
