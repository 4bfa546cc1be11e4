import sys

from spectrum_fast.compare import main

sys.exit(main())
