"""Whether a model's provider key is set: checked before any work, and without litellm (whose import takes seconds)
for the providers whose key variables are known here (`PROVIDER_KEY_VARS`).

Kept apart from models.py so that `launch` checks the key of a common provider without loading the model layer on
the way to its first line. `ProviderModel.check_credentials` uses the same check, and asks litellm for the rest.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Sequence

from orchestrator.direct import check_tls_settings
from orchestrator.errors import ModelError


class MissingAPIKeyError(ModelError):
    def __init__(self, model: str, env_vars: Sequence[str], api_base: str | None = None) -> None:
        self.model = model
        self.env_vars = list(env_vars)
        if self.env_vars:
            first, *others = self.env_vars
            also = f" (or set {' or '.join(others)})" if others else ""
            how = f"set the environment variable {first}{also}, e.g. export {first}=<your key>"
            if api_base and model.startswith("openai/"):
                how += f" (any value will do if the server at {api_base} checks no key)"
        else:
            how = "set the provider's API key environment variable (litellm's provider docs name it)"
        super().__init__(f"model {model!r} needs an API key: {how}")


# Providers whose API key variable is known here, so their key is checked at once, without litellm. Any one of a
# provider's variables, set and not blank, is its key. A test checks that litellm's own `validate_environment` asks
# for the same variables. Other providers are checked with litellm.
PROVIDER_KEY_VARS: dict[str, tuple[str, ...]] = {
    "deepseek": ("DEEPSEEK_API_KEY",),
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "mistral": ("MISTRAL_API_KEY",),
    "groq": ("GROQ_API_KEY",),
    "together_ai": ("TOGETHERAI_API_KEY",),
    "openrouter": ("OPENROUTER_API_KEY",),
    "xai": ("XAI_API_KEY",),
    "fireworks_ai": ("FIREWORKS_AI_API_KEY",),
    "cohere": ("COHERE_API_KEY",),
    "perplexity": ("PERPLEXITYAI_API_KEY",),
    "deepinfra": ("DEEPINFRA_API_KEY",),
    "cerebras": ("CEREBRAS_API_KEY",),
}


def is_local_api_base(api_base: str | None) -> bool:
    """Whether a base URL points at this machine (localhost, 127.x.x.x, ::1) or at a private address of the local
    network (10.x, 172.16-31.x, 192.168.x, fc00::/7, link-local), where OpenAI-compatible servers usually check no
    key."""
    if not api_base:
        return False
    try:
        host = urllib.parse.urlsplit(api_base if "//" in api_base else f"//{api_base}").hostname
    except ValueError:
        return False
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # this machine, or one on the local network (10/8, 172.16/12, 192.168/16, fc00::/7, link-local)
    return address.is_loopback or ((address.is_private or address.is_link_local) and not address.is_unspecified)


def needs_no_key(model: str, api_base: str | None) -> bool:
    """An openai/ model served on this machine or the local network: such servers usually check no key."""
    base = api_base or os.environ.get("OPENAI_API_BASE") or os.environ.get("OPENAI_BASE_URL")
    return model.startswith("openai/") and is_local_api_base(base)


def check_known_provider(model: str, api_base: str | None, direct: bool, api_key: str | None = None) -> bool:
    """For a provider of PROVIDER_KEY_VARS: raise MissingAPIKeyError (without any network) when its key is not
    available, else return True. `direct`: the model's calls skip litellm (direct.route_for), so the CA bundle the
    environment names is checked too. False for any other provider: litellm must tell what it needs."""
    provider, _, bare = model.partition("/")
    known = PROVIDER_KEY_VARS.get(provider)
    if known is None or not bare.strip():
        return False
    if not (api_key or needs_no_key(model, api_base) or any(os.environ.get(v, "").strip() for v in known)):
        raise MissingAPIKeyError(model, known, api_base=api_base)
    if direct:
        check_tls_settings()
    return True
