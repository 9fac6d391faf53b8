"""``python -m ddpm_cifar.app``: the demo app's command line (:func:`.serve.main`)."""

import os
import sys

from ..runtime.stage import run
from .serve import main

run(main)  # bad input ends here: one line on stderr and exit status 1
# Stopped by Ctrl-C or SIGTERM, server closed and temporary folder removed: end the process now. The
# interpreter's own teardown of torch and Gradio took 1 to 2 s more on 2 cores, and aborted the process
# ("terminate called without an active exception") when a step was still running on the torch thread.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
