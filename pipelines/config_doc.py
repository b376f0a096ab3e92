"""docs/config.md from `TrainConfig` itself: every key, its type, its default and the comment beside
it in student_train/config.py, grouped as the source groups them. A test keeps the file in sync.

    python pipelines/config_doc.py > docs/config.md
"""

from __future__ import annotations

import inspect
import re
import typing
from dataclasses import MISSING, fields


def render() -> str:
    from student_train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    defaults = {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(TrainConfig)}
    lines = ["# Training configuration (`TrainConfig`)", "",
             "`lmod train --config FILE.yaml` reads a flat YAML mapping of these keys (unknown keys, wrong types",
             "and impossible values are one-line errors before anything loads); command-line options",
             "(`--steps`, `--seed`, `--kd-tail`, ...) override the file. Generated from",
             "`student_train/config.py` by `python pipelines/config_doc.py`.", ""]
    comment: list[str] = []
    for raw in inspect.getsource(TrainConfig).splitlines()[3:]:
        line = raw.strip()
        if line.startswith("# --"):
            lines += ["", f"## {line[4:].strip().capitalize()}", "", "| key | type | default | meaning |",
                      "|---|---|---|---|"]
            comment = []
        elif line.startswith("#"):
            comment.append(line[1:].strip())
        elif (m := re.match(r"(\w+): [^=]+=", line)) and m.group(1) in defaults:
            name = m.group(1)
            note = " ".join([*comment, line.split("  # ", 1)[1] if "  # " in line else ""]).strip()
            hint = hints[name]
            default = "null" if defaults[name] is None else repr(defaults[name])
            lines.append(f"| `{name}` | {_kind(hint)} | `{default}` | {note.replace('|', '/')} |")
            comment = []
        elif line.startswith("@classmethod"):
            break
    return "\n".join(lines) + "\n"


def _kind(hint: object) -> str:
    """A field's type as a YAML writer reads it: `a \\| b`, `list of float`, `... or null`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return " \\| ".join(args)
    if type(None) in args:
        return " or ".join(_kind(a) for a in args if a is not type(None)) + " or null"
    if typing.get_origin(hint) is list:
        return f"list of {_kind(args[0])}"
    return getattr(hint, "__name__", str(hint))


if __name__ == "__main__":
    print(render(), end="")
