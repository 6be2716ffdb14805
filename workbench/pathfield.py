"""A marker for option fields that name a file: the policy gate (policy.py) finds every one of them.

    path: str = path_field("source", keywords=("source",), description="...")

A marked field's value is either one of its keywords (built-in data such as `pydoc`) or a path
that the gate resolves and checks against the allowed folders. Marking the field, not listing
field names in the gate, means a new method option that reads a file cannot be missed.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic.fields import FieldInfo


def path_field(default: Any, *, keywords: tuple[str, ...] = (), description: str) -> Any:
    return Field(default, description=description, json_schema_extra={"path": True, "keywords": list(keywords)})


def path_keywords(field: FieldInfo) -> tuple[str, ...] | None:
    """The field's keywords when it is a path field, None when it is not one."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and extra.get("path"):
        return tuple(extra.get("keywords") or ())  # type: ignore[arg-type]
    return None
