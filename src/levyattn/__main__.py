import sys

from levyattn.cli import main

sys.exit(main())
