"""The interactive demo: ``python -m ddpm_cifar.app --checkpoint models/ema.pt``.

``engine`` samples (no Gradio), ``ui`` is the Gradio page, ``serve`` the command line that loads
the models and serves the page. No stage imports this package: editing it reruns nothing. Kept
empty, so that importing the engine does not import Gradio.
"""
