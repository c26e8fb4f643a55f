"""dtrain's worker runtime: the training loop that runs inside every process torchrun starts.

Importing this package does not import torch; the modules that need it import it themselves.
"""

__version__ = "0.1.0"
