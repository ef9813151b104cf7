"""Provider adapters by the name the agents file uses (``provider: openai``)."""

from __future__ import annotations

import httpx

from worker.clock import Clock
from worker.providers.anthropic import AnthropicProvider
from worker.providers.base import Delta, Provider, ProviderRequest, ToolCallPiece, Usage
from worker.providers.gemini import GeminiProvider
from worker.providers.openai import OpenAIProvider

__all__ = [
    "Delta",
    "Provider",
    "ProviderRequest",
    "ToolCallPiece",
    "Usage",
    "build_providers",
]


def build_providers(client: httpx.Client, clock: Clock) -> dict[str, Provider]:
    """One adapter per provider name, all sharing the process's HTTP client."""
    return {
        "openai": OpenAIProvider(client, clock),
        "anthropic": AnthropicProvider(client, clock),
        "gemini": GeminiProvider(client, clock),
    }
