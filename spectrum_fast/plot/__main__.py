import sys

from spectrum_fast.plotting import main

sys.exit(main())
