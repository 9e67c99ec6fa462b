import sys

from qlora_lite.cli.main import main

sys.exit(main())
