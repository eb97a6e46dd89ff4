"""The README is the operator guide: every command, command option and config option is in it.

Walks the click group of imagesync.cli (subgroups too, e.g. `policy check`) and every option
of imagesync.conf.list_opts(), and fails naming what README.md lacks. Also guards the README's
opening: the title, then the two commands `tools/demo` and `tools/test`. Pure text checks:
no services, well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from imagesync import cli, conf

README_PATH = Path(__file__).resolve().parents[2] / "README.md"
README = README_PATH.read_text(encoding="utf-8")


def commands(group: click.Group, prefix: str = "imagesync"):
    """(`imagesync status`, command), … for every command and subgroup, depth first."""
    for name, command in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        yield path, command
        if isinstance(command, click.Group):
            yield from commands(command, path)


def long_options(command: click.Command) -> list[str]:
    return sorted(opt for param in command.params if isinstance(param, click.Option)
                  for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--"))


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) for every Markdown heading outside code blocks."""
    out: list[tuple[str, list[str]]] = [("", [])]
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            out.append((line, []))
        else:
            out[-1][1].append(line)
    return [(heading, "\n".join(body)) for heading, body in out]


def config_options():
    for group, opts in conf.list_opts():
        for opt in opts:
            yield group or "DEFAULT", opt.name


def option_documented(group: str, name: str) -> bool:
    """`[group] name` anywhere, or `name` in backticks under a heading naming `[group]`."""
    if f"[{group}] {name}" in README:
        return True
    return any(f"[{group}]" in heading and f"`{name}`" in body
               for heading, body in sections(README))


ALL_COMMANDS = list(commands(cli.main))


def test_the_walk_finds_every_command_including_subcommands():
    paths = {path for path, _ in ALL_COMMANDS}
    assert {"imagesync status", "imagesync policy", "imagesync policy check",
            "imagesync doctor"} <= paths


@pytest.mark.parametrize("path", [p for p, c in ALL_COMMANDS if not isinstance(c, click.Group)])
def test_every_cli_command_is_in_the_readme(path):
    assert path in README, f"README.md does not mention `{path}`: document it"


def test_every_cli_option_is_in_the_readme():
    missing = [f"{path} {opt}" for path, command in
               [("imagesync", cli.main), *ALL_COMMANDS]
               for opt in long_options(command) if opt not in README]
    assert not missing, f"README.md does not mention these options: {', '.join(missing)}"


def test_every_config_option_is_in_the_readme():
    options = list(config_options())
    assert len(options) > 30  # the walk found imagesync's groups, not nothing
    missing = [f"[{g}] {n}" for g, n in options if not option_documented(g, n)]
    assert not missing, (
        "README.md does not document these options (write `[group] name`, or `name` in a "
        f"table under a heading naming `[group]`): {', '.join(missing)}")


def test_the_readme_still_opens_with_the_two_commands():
    lines = README.splitlines()
    assert lines[0] == "# imagesync"
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    first_section = next(i for i, line in enumerate(lines) if line.startswith("## "))
    assert end < first_section, "the two commands must come before the first section"
    assert [line.split()[0] for line in lines[start + 1:end]] == ["tools/demo", "tools/test"]
    after = next(line for line in lines[end + 1:] if line.strip())
    assert after.startswith("Both run as root on Debian 12")
