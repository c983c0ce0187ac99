"""``python -m vitlens.bench ...`` (and ``torchrun --nproc_per_node=K -m vitlens.bench ...``)."""
import sys

from .cli import main

sys.exit(main())
