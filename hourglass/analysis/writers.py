"""Which writer writes: the Anthropic agent when a key is set, else the offline template writer.

The protocol both implement is ``hourglass.analysis.writer``; this module imports the two
implementations, so neither imports back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from hourglass.analysis.writer import Writer


def template_writer() -> Writer:
    """The offline template writer."""
    from hourglass.analysis.template_writer import TemplateWriter

    return TemplateWriter()


def select_writer(settings_or_env: Any = None) -> Writer:
    """The Anthropic agent when ``ANTHROPIC_API_KEY`` is set, else the template writer.

    ``settings_or_env`` is an object with an ``llm_model`` attribute (``hourglass.api.settings.Settings``), a
    mapping of environment variables, or None for ``os.environ``. The CLI and the REST API both
    call this, so ``hourglass analyze`` and the API write the same way. Without a key the agent
    module (and the Anthropic SDK, about a second of imports) is never loaded.
    """
    env: Mapping[str, str] = os.environ
    model: str | None = None
    if isinstance(settings_or_env, Mapping):
        env = settings_or_env
    elif settings_or_env is not None:
        model = getattr(settings_or_env, "llm_model", None)
    fallback = template_writer()
    if not env.get("ANTHROPIC_API_KEY"):
        return fallback
    from hourglass.analysis.agent import DEFAULT_MODEL, MODEL_ENV, AnthropicWriter, default_cache_dir

    return AnthropicWriter(
        fallback,
        model=model or env.get(MODEL_ENV) or DEFAULT_MODEL,
        cache_dir=default_cache_dir(env),
        env=env,
    )
