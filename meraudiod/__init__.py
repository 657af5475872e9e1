"""meraudiod: an always-on, private audio daemon for room devices."""

__version__ = "0.1.0"
