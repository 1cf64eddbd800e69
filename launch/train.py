#!/usr/bin/env python
"""The main job: data-parallel training comparing gradient compressors (see adacomp.workloads.training).

    torchrun --standalone --nproc_per_node 2 launch/train.py            # dense vs AdaComp, digits
    torchrun --standalone --nproc_per_node 4 launch/train.py --data fashion-mnist --epochs 2
    torchrun --standalone --nproc_per_node 4 launch/train.py --data shakespeare --epochs 1
    torchrun --standalone --nproc_per_node 2 launch/train.py --model gpt --data shakespeare --max-steps 300
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adacomp.workloads.training import run_and_exit  # noqa: E402

if __name__ == "__main__":
    run_and_exit()
