"""The built-in mock upstream: fault-injecting, speaking the providers' wire formats."""

from __future__ import annotations

from worker.mockllm.scenarios import (
    Cut,
    ErrorBody200,
    Garbage,
    Idle,
    NoEndMarker,
    Reply,
    Scenario,
    Stall,
    Status,
    Step,
    StreamError,
    WrongContentType,
    scenario_from_dict,
    step_from_dict,
)
from worker.mockllm.server import MockLLM

__all__ = [
    "Cut",
    "ErrorBody200",
    "Garbage",
    "Idle",
    "MockLLM",
    "NoEndMarker",
    "Reply",
    "Scenario",
    "Stall",
    "Status",
    "Step",
    "StreamError",
    "WrongContentType",
    "scenario_from_dict",
    "step_from_dict",
]
