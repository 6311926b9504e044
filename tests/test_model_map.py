"""orchestrator.model_map (litellm's bundled map read as JSON) against the real litellm: same entries, same costs."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from orchestrator import model_map

REPO = Path(__file__).resolve().parent.parent
FIELDS = [
    "max_input_tokens",
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "supports_system_messages",
    "supports_reasoning",
    "litellm_provider",
]
# get_model_info fills a missing per-token price with 0 (e.g. openai/container, which has none); other fields: None.
LITELLM_DEFAULTS = {"input_cost_per_token": 0, "output_cost_per_token": 0}
UNMAPPED = ["openai/my-local-model", "deepseek/no-such-model", "deepseek/gpt-4o", "openai/deepseek-chat"]

# No per-token prices in the map: litellm bills 0.0, cost_usd says None (price unknown), by design.
NO_PRICES = {"openai/container"}
# off_peak_pricing rows (and aliases of them): inside the windows (weekday 00-01, 04-06, 10-24 UTC and all
# weekend) both bill the discounted rates.
OFF_PEAK = {
    "deepseek/deepseek-flash",
    "deepseek/deepseek-flash-latest",
    "deepseek/deepseek-pro-latest",
    "deepseek/deepseek-v4-flash",
    "deepseek/deepseek-v4-flash-vision-exp",
    "deepseek/deepseek-v4-pro",
}
PEAK = datetime(2026, 1, 7, 8, 0, tzinfo=UTC)  # a Wednesday, 08:00 UTC
OFF_PEAK_TIME = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)  # a Saturday
# Where a window starts and ends, on a Wednesday: both must read the windows' edges the same way.
WINDOW_EDGES = [datetime(2026, 1, 7, h, m, tzinfo=UTC) for h, m in ((0, 0), (0, 59), (1, 0), (9, 59), (10, 0),
                                                                     (23, 59))]


def chat_models() -> list[str]:
    """Every deepseek/openai chat model of litellm's map, as provider/<bare name> (aliases included)."""
    import litellm

    names = set()
    for key, info in litellm.model_cost.items():
        provider = info.get("litellm_provider")
        if provider in ("deepseek", "openai") and info.get("mode") == "chat":
            names.add(f"{provider}/{key.removeprefix(f'{provider}/')}")
    assert len(names) > 50 and "deepseek/deepseek-chat" in names and "openai/gpt-4o" in names
    return sorted(names)


def litellm_cost(name: str, prompt: int, completion: int, cached: int, moment: datetime) -> float:
    import litellm
    from litellm._internal_context import pinned_billing_time

    # pinned_billing_time: litellm's own billing clock (what off_peak_pricing reads), pinned, not mocked.
    details = {"cached_tokens": cached} if cached else None
    usage = litellm.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=details,
    )
    response = litellm.ModelResponse(model=name, usage=usage)
    provider = name.partition("/")[0]
    with pinned_billing_time(moment):
        return litellm.completion_cost(completion_response=response, model=name, custom_llm_provider=provider)


def test_entry_agrees_with_litellm_get_model_info_on_every_deepseek_and_openai_chat_model() -> None:
    import litellm

    mismatches: dict[str, Any] = {}
    for name in chat_models():
        theirs = litellm.get_model_info(name)
        ours = model_map.entry(name)
        if ours is None:
            mismatches[name] = "unmapped by model_map"
            continue
        diff = {
            f: (ours.get(f, LITELLM_DEFAULTS.get(f)), theirs.get(f))
            for f in FIELDS
            if ours.get(f, LITELLM_DEFAULTS.get(f)) != theirs.get(f)
        }
        if diff:
            mismatches[name] = diff
    assert mismatches == {}


@pytest.mark.parametrize("name", UNMAPPED)
def test_entry_and_litellm_agree_a_model_is_unmapped(name: str) -> None:
    import litellm

    assert model_map.entry(name) is None
    assert model_map.cost_usd(name, 1000, 300) is None
    with pytest.raises(litellm.exceptions.ModelNotMappedError):
        litellm.get_model_info(name)


@pytest.mark.parametrize(("prompt", "cached"), [(1000, 0), (1000, 400), (300_000, 120_000)],
                         ids=["no-cache", "400-cached", "long-prompt"])
@pytest.mark.parametrize(
    ("moment", "expected_disagreeing"),
    [(PEAK, NO_PRICES), (OFF_PEAK_TIME, NO_PRICES)] + [(moment, NO_PRICES) for moment in WINDOW_EDGES],
    ids=["peak", "off-peak", *(m.strftime("%a-%H:%M") for m in WINDOW_EDGES)],
)
def test_cost_usd_agrees_with_litellm_completion_cost(
    prompt: int, cached: int, moment: datetime, expected_disagreeing: set[str]
) -> None:
    disagreeing = {}
    for name in chat_models():
        ours = model_map.cost_usd(name, prompt, 300, cached_tokens=cached, at=moment)
        theirs = litellm_cost(name, prompt, 300, cached, moment)
        if ours is None or ours != pytest.approx(theirs, rel=1e-9):
            disagreeing[name] = (ours, theirs)
    assert set(disagreeing) == expected_disagreeing, disagreeing


def test_cost_usd_bills_cached_prompt_tokens_at_the_cache_read_price() -> None:
    info = model_map.entry("deepseek/deepseek-chat")
    assert info is not None
    cheaper = model_map.cost_usd("deepseek/deepseek-chat", 1000, 300, cached_tokens=400)
    full = model_map.cost_usd("deepseek/deepseek-chat", 1000, 300)
    assert cheaper is not None and full is not None
    saved = 400 * (info["input_cost_per_token"] - info["cache_read_input_token_cost"])
    assert 0 < cheaper < full and full - cheaper == pytest.approx(saved, rel=1e-9)


def test_entry_does_not_import_litellm() -> None:
    code = "import sys, orchestrator.model_map as m; m.entry('deepseek/deepseek-chat'); print('litellm' in sys.modules)"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "False", "orchestrator.model_map imported litellm (about 1,200 modules)"


@pytest.mark.parametrize("name", sorted(OFF_PEAK))
def test_off_peak_hours_are_billed_at_the_discounted_prices(name: str) -> None:
    peak, off_peak = (model_map.cost_usd(name, 1000, 300, at=moment) for moment in (PEAK, OFF_PEAK_TIME))
    assert peak is not None and off_peak is not None and off_peak < peak
