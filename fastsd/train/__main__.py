import sys

from fastsd.train.trainer import main

sys.exit(main())
