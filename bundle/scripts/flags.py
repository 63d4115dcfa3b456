"""Command-line flag values to Python values: the one place where `--flag value` strings are converted.

`python -m monai.bundle run … --save_png true` hands the config the string 'true' (fire parses only Python literals),
and a non-empty string is truthy, so every boolean flag goes through `as_bool` once: in the `flag` block of each config
for flags the configs use, in the job's constructor for flags it receives raw.
"""

from __future__ import annotations

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")


def as_bool(value: object) -> bool:
    """Command-line flags arrive as bools, ints or strings ('true', 'false', '1', '0')."""
    if isinstance(value, str):
        if value.strip().lower() in TRUE:
            return True
        if value.strip().lower() in FALSE:
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    return bool(value)


def as_list(value: object) -> list:
    """'a,b' strings, tuples (as fire parses '0,5') and scalars → list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]
