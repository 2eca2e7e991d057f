"""Fill the ``{{NAME}}`` placeholders of an sbatch template; each template's ``# default: NAME=value`` lines
give the values used when a placeholder is not set.

    python experiments/slurm/render.py experiments/slurm/stage3_multi_node.sbatch \
        --set NODES=4 --set CONFIG=configs/games/llm.yaml > stage3.sbatch && sbatch stage3.sbatch
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
DEFAULT = re.compile(r"^# default: ([A-Z_]+)=(.*)$", re.MULTILINE)
#: Placeholders that hold shell code or several arguments; every other value must be one plain word.
FREE_FORM = {"SETUP", "EXTRA_ARGS"}
_WORD = re.compile(r"^[\w.:/@%+=,-]+$")


def defaults(template: str) -> dict[str, str]:
    """The ``# default: NAME=value`` lines of ``template``."""
    return {name: value.strip() for name, value in DEFAULT.findall(template)}


def render(template: str, values: dict[str, str] | None = None) -> str:
    """Return ``template`` with every placeholder filled from ``values``, else from its default line.

    Args:
        template: the template's text.
        values: ``{NAME: value}`` overriding the defaults.

    Raises:
        ValueError: a value for a placeholder the template lacks, a placeholder with neither a value nor a
            default, or a value that is not one plain word (spaces, quotes, ``$``...) outside ``FREE_FORM``.
    """
    names = set(PLACEHOLDER.findall(template))
    filled = {**defaults(template), **(values or {})}
    if unknown := sorted(set(values or {}) - names):
        raise ValueError(f"the template has no placeholder {unknown}; it has {sorted(names)}")
    if missing := sorted(names - set(filled)):
        raise ValueError(f"no value for {missing}: pass --set NAME=value (the template has no default for them)")
    for name in names - FREE_FORM:
        if not _WORD.match(filled[name]):
            raise ValueError(f"{name}={filled[name]!r} must be one word (letters, digits, . : / @ % + = , - _)")
    return PLACEHOLDER.sub(lambda match: filled[match.group(1)], template)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("template", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="fill one placeholder")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    pairs = [item.partition("=") for item in args.set]
    if bad := [name for name, sep, _ in pairs if not sep]:
        parser.error(f"--set takes NAME=VALUE, got {bad}")
    try:
        text = render(args.template.read_text(), {name: value for name, _, value in pairs})
    except ValueError as err:
        parser.error(f"{args.template}: {err}")
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
