"""The ranges of the commands' numbers: a value outside is a usage error naming the range."""

from __future__ import annotations

from wstally.options import integer, number

__all__ = ["BYTES", "COUNT", "LIMIT", "PORT", "SECONDS"]

PORT = integer(0, 65535)
COUNT = integer(1)
LIMIT = integer(0)  # 0 disables
BYTES = integer(0)
SECONDS = number(0.0)
