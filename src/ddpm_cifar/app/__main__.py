"""``python -m ddpm_cifar.app``: the demo app's command line (:func:`.serve.main`)."""

from ..runtime.stage import run
from .serve import main

run(main)
