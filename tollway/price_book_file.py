"""Adding price entries to a hand-written `tollway.yaml` without touching anything else in it.

A YAML round trip would drop the operator's comments and layout, so new entries are inserted as lines: each
one a flow mapping with quoted unit prices (exact decimals, never YAML floats), after the last item of the
model's `prices:` list, or as a new `prices:` list at the end of the model. Every other line stays as it was.
The result is then parsed and must equal the old document plus exactly the new entries, and load as a
config; otherwise nothing is written and the operator is told what to add by hand.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from decimal import Decimal
from pathlib import Path

import yaml

from schemas.config import Price, Rates, parse_config


class BookEditError(ValueError):
    """The new entries cannot be placed safely by a line edit."""


_KEY = re.compile(r"^(?P<ind> *)(?P<key>\"[^\"]*\"|'[^']*'|[^\s#'\"][^#]*?)\s*:(?P<rest>\s.*)?$")


def _dec(d: Decimal) -> str:
    return format(d.normalize(), "f")  # 2.000000 (LiteLLM per token x 1M) is written 2


def _rates(r: Rates) -> list[str]:
    parts = [f'input: "{_dec(r.input)}"', f'output: "{_dec(r.output)}"']
    parts += [f'{name}: "{_dec(v)}"' for name in ("cached_input", "cache_write", "cache_write_1h")
              if (v := getattr(r, name)) is not None]  # fmt: skip
    return parts


def _name(n: str) -> str:
    return n if re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", n) else json.dumps(n)


def entry_line(p: Price) -> str:
    """One flow mapping with every dimension the entry sets (nested flow mappings for the tiers)."""
    parts = [f"effective_from: {p.effective_from.isoformat()}", *_rates(p)]
    parts += [f'{name}: "{_dec(v)}"' for name in ("request", "web_search") if (v := getattr(p, name)) is not None]
    if (lc := p.long_context) is not None:
        parts.append("long_context: {" + ", ".join([f"above_prompt_tokens: {lc.above_prompt_tokens}", *_rates(lc)])
                     + "}")  # fmt: skip
    if p.service_tiers:
        tiers = ", ".join(f"{_name(n)}: {{{', '.join(_rates(r))}}}" for n, r in p.service_tiers.items())
        parts.append(f"service_tiers: {{{tiers}}}")
    return "{" + ", ".join(parts) + "}"


def _entry_data(p: Price) -> dict[str, object]:
    return yaml.safe_load(entry_line(p))


def _content(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("#")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _key(line: str) -> tuple[int, str, str] | None:
    m = _KEY.match(line.rstrip("\n"))
    if not m or m["key"].startswith("- "):
        return None
    key = m["key"]
    if key[:1] in "\"'":
        key = key[1:-1]
    return len(m["ind"]), key, (m["rest"] or "").strip()


def _block_end(lines: list[str], start: int, parent_indent: int) -> int:
    """Index after the last content line belonging under lines[start] (indented deeper than its parent)."""
    end = start + 1
    for i in range(start + 1, len(lines)):
        if not _content(lines[i]):
            continue
        if _indent(lines[i]) <= parent_indent:
            break
        end = i + 1
    return end


def _find_model(lines: list[str], model: str) -> tuple[int, int]:
    """(index of the model's key line, index after its block)."""
    top = next((i for i, line in enumerate(lines) if (k := _key(line)) and k[0] == 0 and k[1] == "models"), None)
    if top is None:
        raise BookEditError("no top-level `models:` block")
    models_end = _block_end(lines, top, 0)
    child = next((_indent(line) for line in lines[top + 1 : models_end] if _content(line)), None)
    for i in range(top + 1, models_end):
        k = _key(lines[i])
        if k and k[0] == child and k[1] == model:
            return i, _block_end(lines, i, child)
    raise BookEditError(f"model {model!r} not found as a block under `models:`")


def _insert_model(lines: list[str], model: str, entries: list[Price]) -> list[str]:
    start, end = _find_model(lines, model)
    model_indent = _indent(lines[start])
    body_indent = next((_indent(line) for line in lines[start + 1 : end] if _content(line)), model_indent + 2)
    new = [entry_line(p) for p in entries]
    for i in range(start + 1, end):
        k = _key(lines[i])
        if not (k and k[0] == body_indent and k[1] == "prices"):
            continue
        rest = k[2]
        if rest and not rest.startswith("#"):
            if not re.match(r"^\[\s*\]\s*(#.*)?$", rest):
                raise BookEditError(f"models.{model}.prices is a flow list on one line: write it as a block list")
            comment = rest[rest.index("]") + 1 :].strip()
            head = " " * body_indent + "prices:" + (f"  {comment}" if comment else "") + "\n"
            item = " " * (body_indent + 2)
            return [*lines[:i], head, *(f"{item}- {e}\n" for e in new), *lines[i + 1 :]]
        list_end = _block_end(lines, i, body_indent)
        items = [line for line in lines[i + 1 : list_end] if _content(line)]
        if list_end == i + 1:
            # a block list may sit at the key's own indentation (`prices:` then `- {...}` under it, unindented)
            for j in range(i + 1, end):
                if not _content(lines[j]):
                    continue
                if _indent(lines[j]) == body_indent and not lines[j].lstrip().startswith("- "):
                    break
                list_end = j + 1
            if list_end == i + 1:
                raise BookEditError(f"models.{model}.prices has no items to follow")
            item = " " * body_indent
        else:
            item = " " * _indent(items[0])
        return [*lines[:list_end], *(f"{item}- {e}\n" for e in new), *lines[list_end:]]
    head = " " * body_indent + "prices:\n"
    block = [head, *(f"{' ' * (body_indent + 2)}- {e}\n" for e in new)]
    if end and not lines[end - 1].endswith("\n"):
        lines = [*lines[: end - 1], lines[end - 1] + "\n", *lines[end:]]
    return [*lines[:end], *block, *lines[end:]]


def add_prices(text: str, additions: dict[str, list[Price]], source: str = "tollway.yaml") -> str:
    """`text` with the new entries added under each model's `prices:`; raises BookEditError when the edit
    would do anything else."""
    lines = text.splitlines(keepends=True)
    for model, entries in additions.items():
        if entries:
            lines = _insert_model(lines, model, entries)
    out = "".join(lines)
    before = yaml.safe_load(text)
    expected = copy.deepcopy(before)
    for model, entries in additions.items():
        if entries:
            m = expected["models"][model]
            m["prices"] = [*(m.get("prices") or []), *(_entry_data(p) for p in entries)]
    try:
        after = yaml.safe_load(out)
    except yaml.YAMLError as err:
        raise BookEditError(f"the edited file would not parse: {err}") from None
    if after != expected:
        raise BookEditError("the line edit would change more than the new price entries")
    parse_config(after, source)  # raises ConfigError (e.g. two entries on one date)
    return out


def write_atomically(path: Path, text: str) -> None:
    """Replace the file in one rename, keeping its permissions: a crash leaves the old or the new file."""
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
