"""litellm's bundled model map (context windows, prices, capabilities), read as the JSON file it ships, so that
the routes sent without litellm (`direct`) know what litellm would know without paying for its import.

Looked up as `litellm.get_model_info` does for a provider/model name: the whole name when the map has it for that
provider, else the name without its provider prefix. A test checks both agree on every deepseek and openai chat
model of the map, and that `cost_usd` agrees with `litellm.completion_cost`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

MAP_FILE = "model_prices_and_context_window_backup.json"
_LOCK = threading.Lock()  # the warm-up thread and the first call may both ask first


@cache
def _load() -> dict[str, dict[str, Any]]:
    # Found, not imported: importing litellm's package is what this module exists to avoid.
    spec = importlib.util.find_spec("litellm")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise ModuleNotFoundError("litellm is not installed (its model map comes with it)")
    data = json.loads((Path(folders[0]) / MAP_FILE).read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def load() -> dict[str, dict[str, Any]]:
    """The whole map (loaded once, about 40 ms)."""
    with _LOCK:
        return _load()


def entry(name: str) -> dict[str, Any] | None:
    """The map's entry for `provider/model` (with its `key`), or None when litellm does not know the model."""
    data = load()
    provider, _, bare = name.partition("/")
    candidates = (name, bare) if bare else (name,)
    for key in candidates:
        found = data.get(key)
        for _ in range(4):  # a row that is only {"alias_of": <another row>} stands for that row
            target = found.get("alias_of") if found is not None else None
            if not isinstance(target, str):
                break
            key, found = target, data.get(target)
        if found is not None and (not bare or found.get("litellm_provider") == provider):
            return {**found, "key": key}
    return None


def _minutes(text: str) -> int:
    hours, _, minutes = text.strip().partition(":")
    return int(hours) * 60 + int(minutes or 0)


def _in_window(window: Mapping[str, Any], at: datetime) -> bool:
    """Whether `at` (UTC) falls in one of an off-peak window's hour ranges ("HH:MM-HH:MM", the end excluded,
    00:00 as an end meaning midnight) on one of its ISO weekdays (1 Monday .. 7 Sunday)."""
    if at.isoweekday() not in (window.get("weekdays") or range(1, 8)):
        return False
    ranges = window.get("hours_utc") or []
    now = at.hour * 60 + at.minute
    for span in [ranges] if isinstance(ranges, str) else ranges:
        start_text, _, end_text = str(span).partition("-")
        start, end = _minutes(start_text), _minutes(end_text)
        end = end or 24 * 60
        if start <= now < end:
            return True
    return False


_PRICE_KEYS = ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost")
_THRESHOLD = re.compile(r"^input_cost_per_token_above_(\d+(?:\.\d+)?)(k?)_tokens$")


def _tier(info: Mapping[str, Any], prompt_tokens: int) -> Mapping[str, Any]:
    """The entry's prices for a prompt of this size: a long prompt (above N tokens, where the map has
    `input_cost_per_token_above_<N>_tokens`) is billed, all of it, at that tier's prices."""
    thresholds = []
    for key in info:
        found = _THRESHOLD.match(key)
        if found and info[key] is not None:
            thresholds.append((float(found.group(1)) * (1000 if found.group(2) else 1), key.split("_above_")[1]))
    prices = dict(info)
    for limit, suffix in sorted(thresholds):
        if prompt_tokens > limit:
            for name in _PRICE_KEYS:
                tiered = info.get(f"{name}_above_{suffix}")
                if tiered is not None:
                    prices[name] = tiered
    return prices


def _prices(info: Mapping[str, Any], at: datetime) -> Mapping[str, Any]:
    """The entry's prices in force at `at`: its off-peak prices inside an off-peak window (DeepSeek's discount
    hours), the list prices otherwise."""
    off_peak = info.get("off_peak_pricing")
    if isinstance(off_peak, Mapping):
        try:
            inside = any(_in_window(w, at) for w in off_peak.get("windows") or [] if isinstance(w, Mapping))
        except ValueError:  # a window this code cannot read: the list prices
            inside = False
        if inside:
            return {**info, **{k: v for k, v in off_peak.items() if k != "windows"}}
    return info


def cost_usd(name: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
             at: datetime | None = None) -> float | None:
    """What a call made at `at` (default now) cost at the map's prices then (for a prompt of its size, see
    `_tier`): cached prompt tokens at the cache-read price (the input price when the map has none), the rest of
    the prompt at the input price, the completion at the output price. None when the map lacks the model or
    either price."""
    found = entry(name)
    if found is None:
        return None
    info = _prices(_tier(found, prompt_tokens), at or datetime.now(UTC))
    input_price, output_price = info.get("input_cost_per_token"), info.get("output_cost_per_token")
    if input_price is None or output_price is None:
        return None
    cached = min(max(cached_tokens, 0), prompt_tokens)
    cache_price = info.get("cache_read_input_token_cost")
    cache_price = input_price if cache_price is None else cache_price
    return (prompt_tokens - cached) * input_price + cached * cache_price + completion_tokens * output_price
