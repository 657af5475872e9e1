"""python -m meraudiod."""

from .cli import main

main()
