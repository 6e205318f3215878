"""``python -m trt_dm.cli``: the `trt-dm` command."""
import sys

from trt_dm.cli.main import main

sys.exit(main())
