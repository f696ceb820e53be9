"""The twelve webhook triggers: canonical names, aliases, event names and matching rules.

A hook's ``trigger`` is a comma-separated list of canonical names or aliases. By default a
hook matches exactly (after alias resolution); ``trigger_match = "contains"`` keeps the
seed's substring rule for existing configs. This module is pure data and functions; it
relies on nothing but the standard library.
"""

from __future__ import annotations

import difflib
from enum import StrEnum
from types import MappingProxyType

__all__ = [
    "ALIASES",
    "DENY_TRIGGERS",
    "EVENT_NAMES",
    "TRIGGER_NAMES",
    "TriggerMatch",
    "canonical",
    "nearest_trigger",
    "parse_triggers",
    "split_triggers",
]


class TriggerMatch(StrEnum):
    """How a hook's ``trigger`` value is compared with a fired trigger."""

    EXACT = "exact"  # canonical names and aliases only; a typo is a configuration error
    CONTAINS = "contains"  # the seed's substring rule: ``on_turn_start`` matches turn_start


# canonical name -> (aliases, the ``event`` field of requests and batched events).
# The seed fixes ``on_tool_call_start`` and ``post_tool_execution``; the rest follow one
# rule: ``pre_``/``post_`` triggers end in ``_execution``, every other trigger gets ``on_``.
_TABLE: dict[str, tuple[tuple[str, ...], str]] = {
    "turn_start": ((), "on_turn_start"),
    "tool_call_start": ((), "on_tool_call_start"),
    "pre_tool": (("before_tool",), "pre_tool_execution"),
    "post_tool": (("after_tool",), "post_tool_execution"),
    "turn_complete": (("after_turn",), "on_turn_complete"),
    "post_turn": ((), "post_turn_execution"),
    "session_start": ((), "on_session_start"),
    "session_end": ((), "on_session_end"),
    "error": ((), "on_error"),
    "model_response": ((), "on_model_response"),
    "system_prompt": ((), "on_system_prompt"),
    "message": (("message_received",), "on_message"),
}

TRIGGER_NAMES: tuple[str, ...] = tuple(_TABLE)
"""The canonical trigger names, in the seed's order."""

ALIASES: MappingProxyType[str, str] = MappingProxyType(
    {alias: name for name, (aliases, _) in _TABLE.items() for alias in aliases}
)
"""alias -> canonical name."""

EVENT_NAMES: MappingProxyType[str, str] = MappingProxyType(
    {name: event for name, (_, event) in _TABLE.items()}
)
"""canonical name -> the ``event`` field sent to receivers."""

DENY_TRIGGERS = frozenset({"pre_tool", "tool_call_start"})
"""The triggers where a ``deny`` answer blocks; elsewhere it counts as a warning."""

_SPELLINGS: dict[str, str] = {name: name for name in TRIGGER_NAMES} | dict(ALIASES)
_NAMES_OF: dict[str, tuple[str, ...]] = {
    name: (name, *aliases) for name, (aliases, _) in _TABLE.items()
}


def canonical(trigger: str) -> str | None:
    """The canonical name of a canonical name or alias (case-insensitive), else None."""
    return _SPELLINGS.get(trigger.strip().lower())


def split_triggers(value: str) -> list[str]:
    """The comma-separated parts of a ``trigger`` value, stripped and lower-cased."""
    return [part.strip().lower() for part in value.split(",")]


def nearest_trigger(word: str) -> str:
    """The valid trigger spelling (name or alias) closest to ``word``."""
    word = word.strip().lower()
    for spelling in _SPELLINGS:  # "on_turn_start" -> "turn_start": a known name inside
        if spelling in word:
            return spelling
    best = difflib.get_close_matches(word, list(_SPELLINGS), n=1, cutoff=0.0)
    return best[0] if best else TRIGGER_NAMES[0]


def _contains(part: str, name: str) -> bool:
    # Seed 001's rule runs one way: the configured value contains the trigger's name (or
    # an alias), so "on_turn_start" selects turn_start. The reverse ("tool" inside
    # "pre_tool") would make a fragment select several triggers.
    return bool(part) and any(n in part for n in _NAMES_OF[name])


def parse_triggers(value: str, match: TriggerMatch) -> tuple[frozenset[str], list[str]]:
    """The canonical triggers a ``trigger`` value selects, and one message per bad part.

    Exact: every part must be a name or an alias. Contains (seed 001): a part selects every
    trigger whose name or alias it contains; a part that contains none is an error that
    lists the triggers it was probably meant to be, so a typo or fragment fails loudly.
    """
    selected: set[str] = set()
    problems: list[str] = []
    for part in split_triggers(value):
        if not part:
            problems.append(f"empty trigger in {value!r}")
            continue
        if match is TriggerMatch.EXACT:
            name = canonical(part)
            if name is not None:
                selected.add(name)
                continue
            hint = nearest_trigger(part)
            extra = ' (or set trigger_match = "contains")' if hint in part else ""
            problems.append(f"unknown trigger {part!r}; did you mean {hint!r}?{extra}")
            continue
        found = {name for name in TRIGGER_NAMES if _contains(part, name)}
        if not found:
            within = [s for s in _SPELLINGS if part in s]
            hint = (
                f"triggers containing it: {', '.join(within)}"
                if within
                else f"did you mean {nearest_trigger(part)!r}?"
            )
            problems.append(
                f"trigger {part!r} matches no trigger (a value must contain a whole trigger "
                f"name or alias); {hint}"
            )
        selected |= found
    return frozenset(selected), problems
