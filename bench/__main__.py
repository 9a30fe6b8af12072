import sys

from .engine_bench import main

sys.exit(main())
