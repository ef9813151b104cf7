"""Provider adapters by the name the agents file uses (``provider: openai``)."""

from __future__ import annotations

import httpx

from worker.clock import Clock
from worker.providers.anthropic import AnthropicProvider
from worker.providers.base import Delta, Provider, ProviderRequest, ToolCallPiece, Usage
from worker.providers.gemini import GeminiProvider
from worker.providers.openai import OpenAIProvider
from worker.sse import MAX_EVENT_BYTES

__all__ = [
    "Delta",
    "Provider",
    "ProviderRequest",
    "ToolCallPiece",
    "Usage",
    "build_providers",
]


def build_providers(
    client: httpx.Client, clock: Clock, *, max_event_bytes: int = MAX_EVENT_BYTES
) -> dict[str, Provider]:
    """One adapter per provider name, all sharing the process's HTTP client.

    A line or an event of an answer over ``max_event_bytes`` fails the attempt (fatal).
    """
    return {
        "openai": OpenAIProvider(client, clock, max_event_bytes=max_event_bytes),
        "anthropic": AnthropicProvider(client, clock, max_event_bytes=max_event_bytes),
        "gemini": GeminiProvider(client, clock, max_event_bytes=max_event_bytes),
    }
