"""Errors of the plumbing both daemons share."""

from __future__ import annotations


class MissingExtra(Exception):
    """An option is set whose backend lives in an extra that is not installed.

    The daemons refuse to start with it, before they open anything, and say
    which extra to install.
    """

    def __init__(self, option: str, extra: str, module: str) -> None:
        super().__init__(
            f"{option} needs the {extra!r} extra: pip install 'hostmaint[{extra}]' "
            f"(module {module!r} is not installed)"
        )
        self.option = option
        self.extra = extra
        self.module = module
