import os
import sys

from spectrum_fast import distributed
from spectrum_fast.cli import scan_main

code = scan_main()
if distributed.world_size() > 1:
    # Under torchrun: results are written and closed. Skip interpreter teardown, where a gloo thread
    # still joinable at exit can abort the process ("terminate called without an active exception")
    # and turn a finished scan into a failed run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
