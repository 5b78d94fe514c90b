import sys

from astrai_ds.cli.main import main

sys.exit(main())
