"""`python -m sglang_tq` runs the `sglang-tq` command line."""
from .cli import main

raise SystemExit(main())
