"""Entry point of the imagesync-daemon service."""

from __future__ import annotations

import sys

from imagesync import conf as conf_mod


def main(argv: list[str] | None = None) -> int:
    conf = conf_mod.load(sys.argv[1:] if argv is None else argv)
    from imagesync import service

    return service.run(conf)
