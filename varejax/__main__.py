import sys

from varejax.cli import main

sys.exit(main())
