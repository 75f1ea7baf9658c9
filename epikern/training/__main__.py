"""``python -m epikern.training <target|drafts|proxy> ...``: ``epikern train`` for ``torchrun``."""

import sys

from .cli import run_module

sys.exit(run_module())
