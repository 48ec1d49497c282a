"""Command-line flags derived from config dataclasses, and the config files and overrides they set.

Every field of a config (``TrainConfig``, ``DemoConfig``, ...) and of the configs it nests, however
deep, is a flag named by its dotted path, with dashes or underscores: ``--seq-len``,
``--model.d-model``, ``--optimizer.nesterov true``. A field whose type is a config (or a config or
None) is a section: its fields get flags, not the section itself. A flag's value is read as YAML and
decoded to the field's annotation by draccus (``512``, ``1e-3``, ``true``, ``null``,
``[[0, 1]]``, ``[{ffn: moe}]``); a string field takes the text as it is. What the flags give is a
nested dict of overrides, merged over the ``--config`` file's (YAML or JSON) and then built by
``llmarch.json_config``, so the validation stays in the dataclasses' ``__post_init__``. A field that
is added to a config gets its flag with nothing else to edit; its help comes from its comment or
its class's ``Attributes:`` docstring.

A user's mistake is one line and exit status 2, as everywhere in ``llmarch``: a value of the wrong
type fails while the flags are read (``llmarch train: error: argument --steps (TrainConfig.steps):
'x' is invalid: must be an integer``), a wrong value when the config is built.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

NULLS = ("null", "Null", "NULL", "~", "None", "none")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``llmarch train: error: ...``), exit 2, and
    name the subcommand whose flags were not recognized, with the nearest flag it has."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            parser = self
            for action in self._actions:  # the subcommand that was given, if any
                if isinstance(action, argparse._SubParsersAction):
                    parser = action.choices.get(getattr(parsed, action.dest, None), self)
            message = f"unrecognized arguments: {' '.join(unknown)}"
            flag = next((u.split("=", 1)[0] for u in unknown if u.startswith("--")), None)
            near = difflib.get_close_matches(flag, list(parser._option_string_actions), n=1) if flag else []
            parser.error(message + (f" (did you mean {near[0]}?)" if near else ""))
        return parsed


@dataclasses.dataclass(frozen=True)
class Flag:
    """One leaf field of a config tree.

    Attributes:
      path: the dotted path from the root config, e.g. ``"model.attention.num_heads"``.
      hint: the field's resolved annotation.
      default: the default shown in ``--help``: a value, ``dataclasses.MISSING`` (required), or
        ``FROM_SECTION`` (the section's own base gives it, e.g. the preset's model).
      owner: the dataclass that declares the field.
    """

    path: str
    hint: Any
    default: Any
    owner: type

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]


FROM_SECTION = object()  # a default that the section's base supplies (see Flag.default)


def _section_type(hint: Any) -> type | None:
    """The dataclass of a section field (``C`` or ``C | None``), else None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]) and isinstance(options[0], type):
            return options[0]
    return None


def _field_default(field: dataclasses.Field, parent_default: Any) -> Any:
    if parent_default is FROM_SECTION:
        return FROM_SECTION
    if parent_default is not None and dataclasses.is_dataclass(parent_default):
        return getattr(parent_default, field.name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def walk(cls: type, *, from_section: Iterable[str] = ()) -> tuple[list[Flag], dict[str, type]]:
    """The leaf fields of ``cls``'s tree, in declaration order (each section's after the fields
    before it), and the sections by path. ``from_section``: section paths whose fields default to
    the section's base (e.g. ``"model"``: the preset's), not to their class defaults."""
    flags: list[Flag] = []
    sections: dict[str, type] = {}
    based = set(from_section)

    def visit(owner: type, prefix: str, default: Any, seen: tuple[type, ...]) -> None:
        hints = typing.get_type_hints(owner)
        for field in dataclasses.fields(owner):
            if not field.init:
                continue
            path = prefix + field.name
            value = FROM_SECTION if path in based else _field_default(field, default)
            section = _section_type(hints[field.name])
            if section is not None and section not in seen:
                sections[path] = section
                visit(section, path + ".", value, (*seen, section))
            else:
                flags.append(Flag(path, hints[field.name], value, owner))

    visit(cls, "", None, (cls,))
    return flags, sections


# -- values -----------------------------------------------------------------------------------


def _options(hint: Any) -> tuple[list[Any], bool]:
    """A union's non-None members, and whether None is allowed."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return [a for a in args if a is not type(None)], type(None) in args
    return [hint], False


_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def describe(hint: Any) -> str:
    """What a value of ``hint`` must be, in words: "an integer or null"."""
    options, nullable = _options(hint)
    words = [_WORDS.get(o) or f"YAML for {_type_name(o)}" for o in options]
    return " or ".join(words + (["null"] if nullable else []))


def metavar(hint: Any) -> str:
    options, nullable = _options(hint)
    names = {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}
    text = "|".join(names.get(o, "YAML") for o in options)
    return f"{text}|null" if nullable else text


def _type_name(hint: Any) -> str:
    if typing.get_args(hint):
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def decode(hint: Any, text: str) -> Any:
    """The JSON-like value of ``text`` for a field annotated ``hint``, decoded by draccus.

    Raises:
      ValueError: ``'<text>' is invalid: must be <what hint allows>``.
    """
    import draccus
    from draccus.cfgparsing import parse_string

    options, nullable = _options(hint)
    if nullable and text.strip() in NULLS:
        return None
    if str in options:
        return text  # a string field takes the text as it is: --data 2024 is the file "2024"
    try:
        value = parse_string(text)
    except Exception:  # noqa: BLE001  (YAML syntax)
        value = text
    if isinstance(value, bool) and bool not in options:  # YAML's yes/no/true/false: not numbers
        raise ValueError(f"{text!r} is invalid: must be {describe(hint)}")
    try:
        return draccus.encode(draccus.decode(hint, value))
    except Exception as e:  # noqa: BLE001  (draccus' DecodingError, or a config's own ValueError)
        detail = " ".join(str(e).split())
        simple = all(o in _WORDS for o in options)
        why = "" if simple or not detail else f" ({detail})"
        raise ValueError(f"{text!r} is invalid: must be {describe(hint)}{why}") from None


# -- help ---------------------------------------------------------------------------------------


@functools.cache
def _attribute_docs(cls: type) -> dict[str, str]:
    """``name: text`` entries of a class docstring's ``Attributes:`` section (Google style)."""
    doc = inspect.getdoc(cls) or ""
    match = re.search(r"^Attributes:\n((?:[ \t]+.*\n?|\n)*)", doc, re.MULTILINE)
    if not match:
        return {}
    lines = [line for line in match.group(1).splitlines() if line.strip()]
    if not lines:
        return {}
    indent = len(lines[0]) - len(lines[0].lstrip())
    entries: list[str] = []  # an entry: its first line and the lines indented under it
    for line in lines:
        if len(line) - len(line.lstrip()) <= indent or not entries:
            entries.append(line.strip())
        else:
            entries[-1] += " " + line.strip()
    docs: dict[str, str] = {}
    for entry in entries:  # "a, b: text" documents a and b
        head = re.match(r"^([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*:\s*(.*)$", entry)
        if head:
            for name in head.group(1).split(","):
                docs[name.strip()] = head.group(2)
    return docs


@functools.cache
def field_help(cls: type, name: str) -> str:
    """A field's description: its inline comment, the comment above it (read by draccus), or its
    entry in the class's ``Attributes:`` docstring."""
    try:
        from draccus.wrappers.docstring import get_attribute_docstring

        doc = get_attribute_docstring(cls, name)
        text = doc.comment_inline or doc.comment_above or doc.docstring_below or ""
    except Exception:  # noqa: BLE001  (no source to read, e.g. a class made at run time)
        text = ""
    return " ".join((text or _attribute_docs(cls).get(name, "")).split())


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        return value if value and value.strip() == value else repr(value)
    return repr(value)


class FieldAction(argparse.Action):
    """Stores one field's decoded value under ``dest`` (its path). A bool field also takes no value
    (true) and a ``no-`` form (false): ``--tensorboard``, ``--no-tensorboard``, ``--tensorboard false``."""

    def __init__(self, option_strings, dest, *, flag: Flag, negations=(), shown=(), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.flag, self.negations, self.shown = flag, tuple(negations), tuple(shown)

    def __call__(self, parser, namespace, values, option_string=None):
        # The error names the flag as given and the field: "argument --lr (OptimizerConfig.learning_rate)".
        where = f"argument {option_string} ({self.flag.owner.__name__}.{self.flag.name})"
        if option_string in self.negations:
            if values is not None:
                raise argparse.ArgumentError(None, f"{where}: takes no value, got {values!r}")
            value = False
        elif values is None:  # a bare bool flag
            value = True
        else:
            try:
                value = decode(self.flag.hint, values)
            except ValueError as e:
                raise argparse.ArgumentError(None, f"{where}: {e}") from None
        setattr(namespace, self.dest, value)


class HelpFormatter(argparse.HelpFormatter):
    """Lists a field's flag once (its dashed spelling and aliases, not the underscored one)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=40)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not isinstance(action, FieldAction):
            return super()._format_action_invocation(action)
        value = f" {action.metavar}" if action.nargs != "?" else f" [{action.metavar}]"
        return ", ".join([s + value for s in action.shown] + list(action.negations))


def spellings(path: str) -> list[str]:
    """``--model.d-model`` and ``--model.d_model``: the dashed spelling first."""
    dashed = "--" + path.replace("_", "-")
    return list(dict.fromkeys([dashed, "--" + path]))


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    aliases: Mapping[str, Iterable[str]] = {},
    names: Mapping[str, Iterable[str]] = {},
    helps: Mapping[str, str] = {},
    choices: Mapping[tuple[type, str], Iterable[str]] = {},
    from_section: Mapping[str, str] = {},
    title: str | None = None,
) -> dict[str, Any]:
    """Adds a flag for every leaf field of ``cls``'s tree to ``parser``, one argument group per
    section; each stores the decoded value under its dotted path, only when given.

    Args:
      aliases: more flags for a path (``{"optimizer.learning_rate": ["--lr"]}``).
      names: the flags of a path, instead of its own spellings (``{"preset": ["--student-preset"]}``).
      helps: a path's help, instead of its field's comment.
      choices: ``(class, field) -> allowed values``, listed in the help (the class validates them).
      from_section: section path -> the words for where its fields' defaults come from
        (``{"model": "the preset's"}``).
      title: the first group's title (default: the class name).

    Returns:
      The argument group of each section path ("" for ``cls`` itself), for more flags of a section.
    """
    flags, sections = walk(cls, from_section=from_section)
    taken = set(parser._option_string_actions)  # e.g. --debug, --config: never shadowed
    groups = {"": parser.add_argument_group(title or cls.__name__)}
    for path, section in sections.items():
        where = from_section.get(path)
        text = f"{section.__name__}, {field_help(*_owner(cls, path))}".rstrip(", ")
        if where:
            text += f"; every field defaults to {where}"
        groups[path] = parser.add_argument_group(f"{path} ({text})")
    for flag in flags:
        own = list(names[flag.path]) if flag.path in names else spellings(flag.path)
        strings = [s for s in dict.fromkeys(own + list(aliases.get(flag.path, ()))) if s not in taken]
        if not strings:
            continue
        is_bool = _options(flag.hint)[0] == [bool]
        negations = []
        if is_bool:
            head, _, last = flag.path.replace("_", "-").rpartition(".")
            negations = [f"--{head + '.' if head else ''}no-{last}"]
            negations = [s for s in negations if s not in taken]
        hidden = spellings(flag.path)[1:]  # the underscored spelling works, unlisted
        shown = [s for s in strings if s not in hidden]
        group = groups[flag.path.rpartition(".")[0]]
        group.add_argument(
            *strings,
            *negations,
            dest=flag.path,
            action=FieldAction,
            flag=flag,
            negations=negations,
            shown=shown,
            nargs="?" if is_bool else None,
            metavar=metavar(flag.hint),
            default=argparse.SUPPRESS,
            help=_help(flag, helps.get(flag.path), choices, from_section),
        )
        taken.update(strings + negations)
    return groups


def _owner(root: type, path: str) -> tuple[type, str]:
    """The class that declares ``path``'s last field, and the field's name."""
    owner = root
    *heads, last = path.split(".")
    for head in heads:
        owner = _section_type(typing.get_type_hints(owner)[head])
    return owner, last


def _help(flag: Flag, text: str | None, choices, from_section: Mapping[str, str]) -> str:
    text = (text if text is not None else field_help(flag.owner, flag.name)).rstrip(".")
    allowed = choices.get((flag.owner, flag.name))
    if allowed is not None:
        text += f"{'; ' if text else ''}one of: {', '.join(map(str, allowed))}"
    if flag.default is FROM_SECTION:
        section = next(p for p in from_section if flag.path.startswith(p + "."))
        default = from_section[section]
    elif flag.default is dataclasses.MISSING:
        default = "none: required"
    else:
        default = _show(flag.default)
    # argparse %-formats help: a literal % must be doubled.
    return f"{text} (default: {default})".strip().replace("%", "%%")


# -- overrides and files ------------------------------------------------------------------------


def given(args: argparse.Namespace, paths: Iterable[str]) -> dict[str, Any]:
    """``{path: value}`` of the flags given on the command line among ``paths``."""
    values = vars(args)
    return {p: values[p] for p in paths if p in values}


def set_path(data: dict, path: str, value: Any, base: Callable[[str], dict | None]) -> None:
    """Sets ``data[a][b][c] = value`` for ``path`` "a.b.c"; a section that is absent or null starts
    from ``base(section_path)`` (None: empty, i.e. its class defaults)."""
    *heads, last = path.split(".")
    node = data
    for i, head in enumerate(heads):
        child = node.get(head)
        if not isinstance(child, dict):
            child = copy.deepcopy(base(".".join(heads[: i + 1])) or {})
            node[head] = child
        node = child
    node[last] = value


def merge(
    data: dict, overrides: Mapping[str, Any], base: Callable[[str], dict | None] = lambda path: None
) -> dict:
    """A copy of ``data`` with each ``{path: value}`` set, shallower paths first (a whole section
    given by one flag, then its fields)."""
    out = copy.deepcopy(data)
    for path in sorted(overrides, key=lambda p: p.count(".")):
        set_path(out, path, copy.deepcopy(overrides[path]), base)
    return out


def deep_update(below: dict, above: dict) -> dict:
    """``above`` over ``below``, recursively for dicts on both sides."""
    out = copy.deepcopy(below)
    for key, value in above.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def missing_required(cls: type, data: Mapping[str, Any]) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]


def read_config(path: str | Path, cls: type) -> dict[str, Any]:
    """The fields in a ``.yaml``/``.yml`` (read by draccus, which also follows ``!include``) or a
    ``.json`` file. YAML 1.1 reads ``1e-3`` as a string: such strings become numbers where ``cls``'s
    field is a number.

    Raises:
      ValueError: naming the file, when it is missing, unreadable, not YAML/JSON or not a mapping.
    """
    from llmarch.json_config import read_json

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return read_json(path)
    if suffix not in (".yaml", ".yml"):
        raise ValueError(f"{path} is neither YAML (.yaml, .yml) nor JSON (.json)")
    from draccus.cfgparsing import load_config

    try:
        with path.open(encoding="utf-8") as f:
            data = load_config(f, file=path)
    except Exception as e:  # noqa: BLE001  (draccus wraps yaml's error; its cause says where)
        cause = e.__cause__ or e
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(cause).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of fields, not {type(data).__name__}")
    return _numbers(cls, data)


def _numbers(cls: type, data: dict) -> dict:
    """``data`` with the strings of number fields that read as numbers (``"1e-3"``) converted."""
    if not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        if key not in hints:
            continue
        section = _section_type(hints[key])
        if section is not None and isinstance(value, dict):
            out[key] = _numbers(section, value)
        elif isinstance(value, str) and float in (kinds := _options(hints[key])[0]) and str not in kinds:
            try:
                out[key] = float(value)
            except ValueError:
                pass  # the config's own check names the field
    return out
