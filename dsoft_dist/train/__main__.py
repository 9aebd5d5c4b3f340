"""``python -m dsoft_dist.train --config FILE [--set k=v ...] [--nproc N]``: ``dsoft train``; torchrun's -m target."""
import sys

from dsoft_dist.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
