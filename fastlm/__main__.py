"""`python -m fastlm ...` (and `torchrun --nproc_per_node N -m fastlm pretrain ...`): the command line."""

import sys

from fastlm.cli import main

sys.exit(main())
