"""`--sites` selectors: which attention sites a pass may touch.

A selector is a comma-separated list; a site is selected when any item matches it:
  `attn_3`          a site id
  `4`, `1-10`       a layer index or inclusive range (sites are numbered in execution order)
  `q_len>=1024`     a predicate on an inspect field (==, !=, >=, <=, >, <), e.g. `kind==self`
Several `--sites` options must all match (so `--sites 1-10 --sites q_len>=256` intersects).
"""

from __future__ import annotations

import operator
import re

from attnrewrite.errors import InputError
from attnrewrite.site import AttentionSite

_OPS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_PREDICATE = re.compile(r"^([a-z_]+)\s*(==|!=|>=|<=|>|<|=)\s*(.+)$")
_FIELDS = ("q_len", "kv_len", "num_heads", "head_dim", "instances", "scale", "kind", "bias", "op", "prefix_tokens", "rotary")


def _match_item(item: str, index: int, site: AttentionSite) -> bool:
    if re.fullmatch(r"\d+", item):
        return index == int(item)
    if m := re.fullmatch(r"(\d+)-(\d+)", item):
        lo, hi = int(m.group(1)), int(m.group(2))
        return lo <= index <= hi
    if m := _PREDICATE.match(item):
        field, op, raw = m.group(1), m.group(2), m.group(3).strip()
        op = "==" if op == "=" else op
        value = site.to_json().get(field)
        if value is None:
            return False
        if isinstance(value, bool):
            target = raw.lower() in ("1", "true", "yes")
        elif isinstance(value, (int, float)):
            target = float(raw)
        else:
            target = raw
        return bool(_OPS[op](value, target))
    return site.id == item


def validate(selectors: tuple[str, ...] | list[str]) -> None:
    """Reject malformed selectors before any work is done."""
    for selector in selectors:
        for item in filter(None, (s.strip() for s in selector.split(","))):
            if m := _PREDICATE.match(item):
                if m.group(1) not in _FIELDS:
                    raise InputError(f"--sites: unknown field {m.group(1)!r}; valid fields: {', '.join(_FIELDS)}.")
                if m.group(1) in ("q_len", "kv_len", "num_heads", "head_dim", "instances", "scale", "prefix_tokens"):
                    try:
                        float(m.group(3))
                    except ValueError:
                        raise InputError(f"--sites: {item!r} compares a number with {m.group(3)!r}.") from None
            elif m := re.fullmatch(r"(\d+)-(\d+)", item):
                if int(m.group(1)) > int(m.group(2)):
                    raise InputError(f"--sites: empty range {item!r}.")
            elif not re.fullmatch(r"\d+|[A-Za-z_][\w./-]*", item):
                raise InputError(f"--sites: cannot read {item!r}; use an id (attn_3), a range (0-5) or a predicate (q_len>=1024).")


def select(sites: list[AttentionSite], selectors: tuple[str, ...] | list[str]) -> list[AttentionSite]:
    """Sites matching every selector (each selector: any of its comma-separated items)."""
    validate(selectors)
    chosen = []
    for index, site in enumerate(sites):
        if all(
            any(_match_item(item, index, site) for item in filter(None, (s.strip() for s in sel.split(","))))
            for sel in selectors
        ):
            chosen.append(site)
    return chosen
