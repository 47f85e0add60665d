"""Ahead-of-time compile checks for a TPU topology this machine does not hold (see pasta_jax/aot.py).

Command:  python launch/aot_check.py --config=configs/paper.py --topology=v5e:4x4 --output=aot.json
          (the same as python -m pasta_jax.aot with these flags)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pasta_jax import aot  # noqa: E402

if __name__ == "__main__":
  aot.run()
