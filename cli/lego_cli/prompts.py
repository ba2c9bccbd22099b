"""A synthetic prompt set with a known repetition structure, for benchmarks of prompt caching.

`zipf:distinct=200,s=1.1,seed=0` makes `distinct` prompts (a subject, a style and a setting, read
in order from the lists below, so prompt i is always the same text) and draws each request's prompt
by rank from a Zipf law with exponent `s`: prompt i is drawn with probability ∝ 1 / (i + 1)^s. The
larger `s` and the smaller `distinct`, the more requests repeat an earlier prompt, as production
prompt streams do (a few popular prompts, a long tail). Seeded, so every run draws the same.
Prompts sharing a subject and a style differ only in their setting: near neighbours for caches that
match by similarity rather than exactly.
"""

from __future__ import annotations

import itertools
import random
import re

SUBJECTS = (
    "a red fox", "an old lighthouse", "a bowl of ramen", "a vintage car", "a snowy owl",
    "a glass teapot", "a mountain cabin", "a koi pond", "a steam train", "a sunflower field",
)  # fmt: skip
STYLES = ("photograph", "watercolour", "oil painting", "pencil sketch", "3d render")
SETTINGS = ("at dawn", "at night", "in the rain", "in autumn", "under a clear sky")
MAX_DISTINCT = len(SUBJECTS) * len(STYLES) * len(SETTINGS)


def prompt(index: int) -> str:
    subject, style, setting = next(
        itertools.islice(itertools.product(SUBJECTS, STYLES, SETTINGS), index, None)
    )
    return f"{style} of {subject} {setting}"


def parse_zipf(spec: str, what: str = "prompt set", limit: int = MAX_DISTINCT) -> tuple[int, float, int]:
    """`zipf:distinct=N,s=S,seed=K` → (N, S, K); errors name the field, its limit and the value."""
    match = re.fullmatch(r"zipf:(.*)", spec)
    if match is None:
        raise ValueError(f"{what} {spec!r}: expected zipf:distinct=N,s=S[,seed=K]")
    fields: dict[str, str] = {}
    for part in filter(None, match.group(1).split(",")):
        name, _, value = part.partition("=")
        if name not in ("distinct", "s", "seed"):
            raise ValueError(f"{what} {spec!r}: unknown field {name!r} (distinct, s, seed)")
        fields[name] = value
    try:
        distinct, exponent, seed = int(fields["distinct"]), float(fields["s"]), int(fields.get("seed", "0"))
    except KeyError as missing:
        raise ValueError(f"{what} {spec!r}: {missing.args[0]} is required") from None
    except ValueError:
        raise ValueError(f"{what} {spec!r}: distinct and seed are integers, s a number") from None
    if not 1 <= distinct <= limit:
        raise ValueError(f"{what} {spec!r}: distinct must be in [1, {limit}], got {distinct}")
    if exponent < 0:
        raise ValueError(f"{what} {spec!r}: s must be >= 0, got {exponent}")
    return distinct, exponent, seed


def parse_prompt_set(spec: str) -> tuple[int, float, int]:
    return parse_zipf(spec)


def draw_ranks(spec: str, count: int, what: str = "prompt set", limit: int = MAX_DISTINCT) -> list[int]:
    """`count` ranks in [0, distinct) drawn from the Zipf law `spec` (rank i ∝ 1 / (i + 1)^s)."""
    distinct, exponent, seed = parse_zipf(spec, what, limit)
    weights = [1.0 / (rank + 1) ** exponent for rank in range(distinct)]
    return random.Random(seed).choices(range(distinct), weights=weights, k=count)


def draw_prompts(spec: str, count: int) -> list[str]:
    """`count` prompts drawn from the set `spec` (see the module's docstring)."""
    return [prompt(rank) for rank in draw_ranks(spec, count)]


def repeat_share(prompts: list[str]) -> float:
    """The share of prompts that appeared earlier in the list: what an exact cache can hit."""
    seen: set[str] = set()
    repeats = 0
    for text in prompts:
        repeats += text in seen
        seen.add(text)
    return repeats / len(prompts) if prompts else 0.0
