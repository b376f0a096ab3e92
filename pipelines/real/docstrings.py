"""Real prompts that no one here wrote: the Python standard library's function docstrings, turned
into questions and split by module (training modules and held-out modules never share a function)."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

TRAIN_MODULES = ("json", "os.path", "shutil", "textwrap", "itertools", "functools", "collections", "heapq",
                 "bisect", "statistics", "string", "random", "math", "fractions", "pathlib", "glob", "fnmatch",
                 "tempfile", "csv", "base64", "hashlib", "zlib", "gzip", "calendar", "copy", "operator",
                 "difflib", "re", "shlex", "struct", "codecs", "zipfile", "tarfile", "logging", "contextlib")
HELD_OUT_MODULES = ("urllib.parse", "html", "email.utils", "secrets", "unicodedata", "ipaddress", "uuid",
                    "inspect", "dataclasses", "enum", "typing", "argparse", "datetime", "pprint", "decimal")


def questions(modules: tuple[str, ...], limit: int | None = None, max_chars: int = 300) -> list[dict]:
    """One question per public function with a docstring, in a fixed order (module, then name)."""
    out = []
    for name in modules:
        module = importlib.import_module(name)
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            first = " ".join(doc.split("\n\n")[0].split())
            if len(first) < 40:
                continue
            text = first[:max_chars].rsplit(" ", 1)[0] + " ..." if len(first) > max_chars else first
            out.append({"id": f"{name}.{attr}", "question": f"In one or two sentences, what does the Python "
                        f"function {name}.{attr} do? Its documentation says: {text}"})
    return out[:limit]


def write_questions(out: Path, modules: tuple[str, ...], limit: int | None = None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(q) + "\n" for q in questions(modules, limit)))
    return out
