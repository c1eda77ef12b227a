"""What every stage entry point shares: logging, argument parsing, clean failures."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import ConfigError, StudyConfig, load_config


class _OneDefault(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` only where the help does not state its default already (``(default:
    from params)``) and there is one to show (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=_OneDefault)
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="the study's params file")
    return p


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def config(path: Path) -> StudyConfig:
    """Load params.yaml or exit(2) with the message naming the bad keys."""
    try:
        return load_config(path)
    except ConfigError as err:
        sys.exit(f"error: {err}")


def run(main: Callable[[], None], *expected: type[BaseException]) -> None:
    """Run ``main``; known errors become a one-line message and exit code 1, not a traceback."""
    setup_logging()
    try:
        main()
    except expected as err:
        logging.getLogger("stages").error("%s", err)
        sys.exit(1)
