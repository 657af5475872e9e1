"""python -m meraudiod."""

from .signals import main

main()
