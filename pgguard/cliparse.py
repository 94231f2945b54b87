# The argparse parser the subcommand CLIs (audit, approvals) share: usage errors are
# raised, so each CLI prints them in its own one-line form and exit code.
from __future__ import annotations

import argparse


class UsageError(Exception):
    """A command line argparse refused; the message says why."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)
