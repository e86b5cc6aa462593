"""python -m fastsd.train: the trainer's command line (fastsd/train/trainer.py)."""
import sys

from fastsd.train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
