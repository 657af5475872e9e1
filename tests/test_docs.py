"""The README, `--help` and config.example.toml against the code, so they cannot drift apart.

Every list here is derived from the code (click commands, pydantic settings, the command
table, the MQTT message classes) and from the README's own tables, in both directions where
the README promises completeness: a new command, option, config key, MQTT command or topic
fails here until it is documented, and a documented one fails once it is gone.
"""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from meraudiod import commands, messages
from meraudiod.cli import main
from meraudiod.config import Settings
from meraudiod.homeassistant import discovery_topic

from .conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
EXAMPLE = (REPO / "config.example.toml").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The README text under `## title` (or `### title`), up to the next heading of its level
    (a `#` comment inside a code block is not a heading)."""
    lines = README.splitlines()
    start = lines.index(
        next(line for line in lines if re.fullmatch(rf"#+ {re.escape(title)}", line))
    )
    level = len(lines[start].split(" ")[0])
    body, fenced = [], False
    for line in lines[start + 1 :]:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        body.append(line)
    return "\n".join(body)


def table(text: str, first_header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose first column is `first_header`."""
    lines = text.splitlines()
    start = next(
        i
        for i, line in enumerate(lines)
        if line.startswith("|") and _cells(line)[0] == first_header
    )
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    return rows


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def ticked(text: str) -> list[str]:
    """What is in backticks, outside parentheses (which hold values and remarks)."""
    while re.search(r"\([^()]*\)", text):
        text = re.sub(r"\([^()]*\)", "", text)
    return re.findall(r"`([^`]+)`", text)


# --- the command line ------------------------------------------------------------------------


def walk(
    group: click.Group, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command and group, with its path under `meraudiod`."""
    found: list[tuple[tuple[str, ...], click.Command]] = []
    for name, command in sorted(group.commands.items()):
        found.append(((*prefix, name), command))
        if isinstance(command, click.Group):
            found += walk(command, (*prefix, name))
    return found


COMMANDS = walk(main)
LEAVES = [(path, c) for path, c in COMMANDS if not isinstance(c, click.Group)]
CLI_ROWS = [row[0] for row in table(section("Command line"), "command")]


def _option_names(command: click.Command) -> set[str]:
    return {
        opt
        for param in command.params
        if isinstance(param, click.Option)
        for opt in (*param.opts, *param.secondary_opts)
    }


def _rows_for(path: tuple[str, ...]) -> list[str]:
    """Table rows that document `meraudiod PATH` (`recordings show ID`, `export ID...` and
    `speakers list|enroll|...` name several commands in one row)."""
    head = f"`meraudiod {path[0]}"
    rows = [row for row in CLI_ROWS if row.startswith(head + " ") or row.startswith(head + "`")]
    if len(path) == 1:
        return rows
    word = re.compile(rf"(^|[\s|`,]){re.escape(path[1])}($|[\s|`,])")
    return [row for row in rows if word.search(row.removeprefix(head))]


@pytest.mark.parametrize("path", [p for p, _ in LEAVES], ids=" ".join)
def test_every_command_is_in_the_readme_table(path: tuple[str, ...]) -> None:
    assert _rows_for(path), f"`meraudiod {' '.join(path)}` is missing from the README's table"


def test_every_command_in_the_readme_table_exists() -> None:
    known = {path for path, _ in COMMANDS}
    for row in CLI_ROWS:
        first = re.match(r"`meraudiod ([a-z-]+)", row)
        assert first and (first.group(1),) in known, row


def test_options_in_the_readme_table_exist() -> None:
    for row in CLI_ROWS:
        commands_of_row = [c for path, c in LEAVES if row in _rows_for(path)]
        options = set().union(*(_option_names(c) for c in commands_of_row))
        for option in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", row):
            assert option in options, f"{option} in {row!r} is not an option of that command"


@pytest.mark.parametrize("path", [p for p, _ in LEAVES], ids=" ".join)
def test_every_option_is_documented(path: tuple[str, ...]) -> None:
    """In the command's table row, or in a README line that shows the command."""
    command = dict(LEAVES)[path]
    shown = "\n".join(_rows_for(path))
    shown += "\n".join(
        line for line in README.splitlines() if f"meraudiod {' '.join(path)}" in line
    )
    common = {"--help", "-h", "--config", "--json", "-v", "--verbose"}  # said once, for all
    for param in command.params:
        if not isinstance(param, click.Option) or not set(param.opts) - common:
            continue
        assert any(opt in shown for opt in param.opts), (
            f"`meraudiod {' '.join(path)}` {'/'.join(param.opts)} is not in the README"
        )


def test_the_readme_says_which_commands_take_config_and_json() -> None:
    claim = re.search(
        r"Every command but ((?:`[^`]+`(?:, | and )?)+) takes `--config PATH`", README
    )
    assert claim, "the README's claim about --config has changed: update this test"
    without = {tuple(name.split()) for name in re.findall(r"`([^`]+)`", claim.group(1))}
    for path, command in LEAVES:
        takes = "--config" in _option_names(command)
        assert takes == (path not in without), f"meraudiod {' '.join(path)}: --config {takes}"
    for path, command in LEAVES:  # "every listing --json"
        if path[-1] in ("list", "jobs", "status"):
            assert "--json" in _option_names(command), path


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=" ".join)
def test_every_help_has_an_example(path: tuple[str, ...]) -> None:
    """The README says `--help` shows examples: for every command and group."""
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and "meraudiod " in result.output.split("Example")[1], path


# --- configuration ---------------------------------------------------------------------------


def _sections() -> dict[str, type[BaseModel]]:
    found = {}
    for name, field in Settings.model_fields.items():
        assert isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        found[name] = field.annotation
    return found


SECTIONS = _sections()


def _has_key(model: type[BaseModel], dotted: str) -> bool:
    """`key`, or `table.key` in a nested table (`asr.wyoming.servers`)."""
    head, _, rest = dotted.partition(".")
    field = model.model_fields.get(head)
    if field is None:
        return False
    if not rest:
        return True
    nested = field.annotation
    return isinstance(nested, type) and issubclass(nested, BaseModel) and _has_key(nested, rest)


def test_readme_config_table_names_real_sections_and_keys() -> None:
    rows = table(section("Configuration"), "section")
    documented: set[str] = set()
    for names, keys in rows:
        row_sections = ticked(names)
        documented.update(row_sections)
        for name in row_sections:
            assert name in SECTIONS, f"README config table: no section {name!r}"
        for key in (k for text in ticked(keys) for k in text.split(" / ")):
            assert any(_has_key(SECTIONS[s], key) for s in row_sections), (
                f"README config table: {'/'.join(row_sections)}.{key} is not a setting"
            )
    assert documented == set(SECTIONS), f"sections missing: {set(SECTIONS) - documented}"


def test_every_section_key_named_in_the_readme_exists() -> None:
    """`asr.max_attempts`, `MERAUDIOD_ASR__CPU_THREADS` and the like, anywhere in the README."""
    named = re.findall(r"`([a-z]+)\.([a-z_]+)`", README) + re.findall(
        r"`([a-z]+)\.([a-z_]+) = ", README
    )
    named += [
        (s.lower(), k.lower()) for s, k in re.findall(r"MERAUDIOD_([A-Z]+)__([A-Z_]+)", README)
    ]
    checked = 0
    for name, key in named:
        if name in SECTIONS and key != "py":  # `vad.py` is a file
            assert key in SECTIONS[name].model_fields or key == "*", f"README: {name}.{key}"
            checked += 1
    assert checked > 20  # the patterns still find the README's references


def test_example_config_names_only_real_keys() -> None:
    """Every key line of config.example.toml, set or commented out, is a setting (the other
    direction, every setting in the example with its default, is tests/test_config.py)."""
    current = None
    seen = 0
    for line in EXAMPLE.splitlines():
        if header := re.fullmatch(r"\[([a-z_.]+)\]", line.strip()):
            current = header.group(1)
            section_name, _, table_name = current.partition(".")
            assert section_name in SECTIONS, f"config.example.toml: no section [{current}]"
            assert not table_name or _has_key(SECTIONS[section_name], table_name), current
        elif key := re.match(r"#? ?([a-z_]+) = ", line):
            assert current is not None
            section_name, _, table_name = current.partition(".")
            dotted = f"{table_name}.{key.group(1)}" if table_name else key.group(1)
            assert _has_key(SECTIONS[section_name], dotted), f"{current}.{key.group(1)}"
            seen += 1
    assert seen >= sum(len(m.model_fields) for m in SECTIONS.values())


# --- MQTT ------------------------------------------------------------------------------------


def test_readme_mqtt_commands_match_the_command_table() -> None:
    rows = table(section("Commands"), "command")
    documented = {}
    for name, args, admin in rows:
        (command,) = ticked(name)
        documented[command] = (set(ticked(args)), admin == "yes")
    actual = {
        name: (set(command.args.model_fields), command.admin)
        for name, command in commands.COMMANDS.items()
    }
    assert documented == actual


def _code_topics() -> dict[str, int | None]:
    """Topics under the base topic that the code publishes or subscribes to, a variable part
    written `<>`, with the QoS of the message classes that carry one."""
    topics: dict[str, int | None] = {}
    for obj in vars(messages).values():
        topic = getattr(obj, "topic", None)
        if isinstance(obj, type) and isinstance(topic, str) and topic != "event":
            topics[topic] = getattr(obj, "qos", None)
    source = "\n".join(p.read_text() for p in sorted((REPO / "meraudiod").glob("*.py")))
    patterns = (
        r"Outgoing\(\s*f?\"([a-z_/]+)([{#]?)",
        r"\{self\.base\}/([a-z_/]+)([{#]?)",
        r"\{base_topic\(settings\)\}/([a-z_/]+)([{#]?)",
        r"f\"((?:request|response)/)([{])",
    )
    for pattern in patterns:
        for topic, wildcard in re.findall(pattern, source):
            topics.setdefault(topic + "<>" if wildcard or topic.endswith("/") else topic, None)
    return topics


def test_readme_mqtt_topics_match_the_code() -> None:
    rows = table(section("MQTT"), "topic")
    documented: dict[str, str] = {}
    for row in rows:
        for topic in re.findall(r"`<base>/([^`]+)`", row[0]):
            documented[re.sub(r"<[^>]+>", "<>", topic)] = row[2]
    code = _code_topics()
    assert set(documented) == set(code), (
        f"undocumented: {set(code) - set(documented)}; gone: {set(documented) - set(code)}"
    )
    for topic, qos in code.items():
        if qos is not None:
            assert documented[topic] == str(qos), f"{topic}: README QoS {documented[topic]}"
    settings = Settings()
    settings.mqtt.node_id = "kitchen"
    discovery = discovery_topic(settings).replace("kitchen", "<node_id>")
    assert any(f"`{discovery}`" in row[0] for row in rows), discovery


def test_no_leftover_markers() -> None:
    assert "<!--" not in README
    assert not re.search(r"\bTODO\b|\bFIXME\b|\bXXX\b", README)


def test_readme_links_to_files_that_exist() -> None:
    for target in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (REPO / target).exists(), target


def test_readme_anchors_exist() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", README, re.MULTILINE)
    }
    for anchor in re.findall(r"\]\(#([^)]+)\)", README):
        assert anchor in headings, anchor


def test_module_list_names_every_module() -> None:
    """How it works lists one file per stage; every module is in it, and nothing else."""
    listed = set(re.findall(r"`([a-z_]+\.py)`", section("How it works")))
    actual = {p.name for p in (REPO / "meraudiod").glob("*.py")} - {"__init__.py", "__main__.py"}
    anywhere = {p.name for p in (REPO / "meraudiod").rglob("*.py")}  # http/app.py too
    assert actual <= listed, f"not listed: {actual - listed}"
    assert listed <= anywhere, f"gone: {listed - anywhere}"
