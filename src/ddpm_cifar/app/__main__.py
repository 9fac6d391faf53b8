"""``python -m ddpm_cifar.app``: the demo app's command line (:func:`.serve.main`)."""

from ..cli import run
from .serve import main

run(main)
