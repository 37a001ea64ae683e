"""Writes the YAML files (rules, Prometheus configuration) without a YAML
library: every string is written as a JSON string, which is a YAML
double-quoted scalar; keys are plain identifiers."""

from __future__ import annotations

import json


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):  # only empty ones get here
        return "[]" if isinstance(value, list) else "{}"
    return json.dumps(value)


def _lines(value: object, depth: int) -> list[str]:
    pad = "  " * depth
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines += _lines(item, depth + 1)
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return lines
    if isinstance(value, list):
        lines = []
        for item in value:
            inner = _lines(item, depth + 1)
            lines.append(f"{pad}- {inner[0].lstrip()}")  # "- " takes one level's indent
            lines += inner[1:]
        return lines
    return [pad + _scalar(value)]


def dump(value: object, header: str = "") -> str:
    comment = [f"# {line}".rstrip() for line in header.splitlines()]
    return "\n".join(comment + _lines(value, 0)) + "\n"
