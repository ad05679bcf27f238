"""Argument types the `lldif` subcommands share, so a bad number gives one argparse error line."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def integer_at_least(least: int, what: str = "") -> Callable[[str], int]:
    """An argparse type accepting integers >= `least` (`what` names the unit in the error, e.g. "pixels")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            unit = f" {what}" if what else ""
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}{unit}, got {text!r}")
        return value

    return parse


non_negative_int = integer_at_least(0)
positive_int = integer_at_least(1)
