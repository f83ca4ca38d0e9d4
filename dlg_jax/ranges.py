"""Index and seed lists on the command line: '0:50' (a Python range), '0:50:5', '3,7,9', '25', or a mix '0:4,10'.

Shared by `dlg_jax.run`, `dlg_jax.sweep` and the experiments, so all read ranges the same way and
reject empty or inverted ones with the same one-line error.
"""

from __future__ import annotations

from dlg_jax.errors import UsageError


MAX_VALUES = 1_000_000  # a list longer than this is a typo, not a sweep (0:20000000 took 1.9 GB to refuse)


def parse_range(text: str, flag: str = "--indices", limit: int = MAX_VALUES) -> list[int]:
    """The integers `text` names, in order, without repeats; `flag` names the option in error messages.

    Each comma-separated part is an integer or start:stop[:step] (stop exclusive, as Python's range). A
    part that names nothing (5:5, 9:2) is an error rather than silently skipped: an inverted range is
    almost always a typo, and a sweep over nothing should not quietly succeed.
    """
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if ":" in part:
                bounds = [int(x) for x in part.split(":")]
                if len(bounds) not in (2, 3) or (len(bounds) == 3 and bounds[2] == 0):
                    raise ValueError
                span = range(*bounds)
                if len(values) + len(span) > limit:
                    raise UsageError(f"{flag} {text!r}: more than {limit:,} values")
                if not span:
                    raise UsageError(f"{flag} {text!r}: {part} is an empty or inverted range (stop must exceed start)")
                values.extend(span)
            else:
                values.append(int(part))
        except ValueError:
            raise UsageError(f"{flag} {text!r}: expected start:stop[:step] or a comma list of integers") from None
    seen: set[int] = set()
    unique = [v for v in values if not (v in seen or seen.add(v))]
    if not unique:
        raise UsageError(f"{flag} {text!r}: empty range")
    return unique
