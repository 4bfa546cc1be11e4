import sys

from spectrum_fast.cli import scan_main

sys.exit(scan_main())
