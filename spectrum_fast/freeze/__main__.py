import sys

from spectrum_fast.cli import freeze_main

sys.exit(freeze_main())
