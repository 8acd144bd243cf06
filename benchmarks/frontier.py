"""The sparsity frontier (issue 17): the same as `zoo frontier` (train/frontier.py), run as a benchmark script.

    python benchmarks/frontier.py --help
    python benchmarks/frontier.py --out runs/frontier          # the full tiny frontier (~2 h on 2 cores)
"""

import sys

from train.frontier import main

if __name__ == "__main__":
    sys.exit(main())
