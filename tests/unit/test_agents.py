"""The agents file: schema, defaults, durations, and one clear error per mistake."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from worker.agents import format_duration, load_agents, parse_agents, parse_duration
from worker.errors import ConfigError

SOURCE = "agents.yaml"


def _doc():
    return {
        "models": {
            "fast": {
                "provider": "openai",
                "base_url": "http://127.0.0.1:8700/v1",
                "model": "gpt-4o-mini",
                "api_key_env": "FAST_KEY",
                "timeouts": {"connect": "5s", "first_token": "30s", "idle": "30s", "total": "10m"},
            },
            "steady": {"provider": "openai", "base_url": "http://localhost:8700/v1", "model": "s"},
        },
        "agents": {
            "support": {
                "model": "fast",
                "fallbacks": ["steady"],
                "retries": 2,
                "cooldown": "1m",
                "cooldown_on_exhausted": True,
                "retry_on_rate_limit": False,
                "backoff": {"base": "200ms", "factor": 2, "max": "2s", "jitter": 0.1},
            }
        },
    }


def test_agents_design_example_loads_with_its_values():
    """The design's example file loads into a chain with its retries, cooldown and backoff."""
    agent = parse_agents(_doc(), source=SOURCE).agents["support"]

    assert agent.chain_names == ("fast", "steady")
    assert agent.max_attempts == 3
    assert agent.cooldown_s == 60.0
    assert (agent.backoff.base_s, agent.backoff.factor, agent.backoff.max_s) == (0.2, 2, 2.0)
    assert agent.chain[0].timeouts.total == 600.0


def test_agents_omitted_knobs_take_designs_defaults():
    """An agent naming only its model gets retries 2, cooldown 1m, cooldown_on_exhausted on."""
    doc = _doc()
    doc["agents"] = {"bare": {"model": "steady"}}

    agent = parse_agents(doc, source=SOURCE).agents["bare"]

    assert agent.chain_names == ("steady",)
    assert agent.retries == 2
    assert agent.cooldown_s == 60.0
    assert agent.cooldown_on_exhausted is True
    assert agent.retry_on_rate_limit is False
    assert agent.chain[0].timeouts.connect == 5.0


def _set(path, value):
    def mutate(doc):
        *head, last = path
        node = doc
        for part in head:
            node = node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()


@pytest.mark.parametrize(
    ("mutate", "key_path", "problem"),
    [
        pytest.param(
            _set(("agents", "support", "fallbacks"), ["nope"]),
            "agents.support.fallbacks[0]",
            "unknown model 'nope'",
            id="unknown-fallback",
        ),
        pytest.param(
            _set(("agents", "support", "model"), "ghost"),
            "agents.support.model",
            "unknown model 'ghost'",
            id="unknown-primary",
        ),
        pytest.param(
            _set(("agents", "support", "model"), _DELETE),
            "agents.support.model",
            "Field required",
            id="agent-without-model",
        ),
        pytest.param(
            _set(("agents", "support", "cooldown"), "5 parsecs"),
            "agents.support.cooldown",
            "expected a duration",
            id="bad-duration",
        ),
        pytest.param(
            _set(("models", "fast", "timeouts", "idle"), "-3s"),
            "models.fast.timeouts.idle",
            "expected a duration",
            id="bad-timeout",
        ),
        pytest.param(
            _set(("agents", "support", "backoff", "max"), float("inf")),
            "agents.support.backoff.max",
            "must be finite",
            id="infinite-duration",
        ),
        pytest.param(
            _set(("agents", "support", "retries"), -1),
            "agents.support.retries",
            "greater than or equal to 0",
            id="negative-retries",
        ),
        pytest.param(
            _set(("agents", "support", "fallbacks"), ["steady", "steady"]),
            "agents.support.fallbacks[1]",
            "appears twice",
            id="duplicate-model",
        ),
        pytest.param(
            _set(("agents", "support", "fallbacks"), ["fast"]),
            "agents.support.fallbacks[0]",
            "appears twice",
            id="primary-as-fallback",
        ),
        pytest.param(
            _set(("models", "steady", "base_url"), "ftp://127.0.0.1/v1"),
            "models.steady.base_url",
            "expected an http(s) URL",
            id="non-http-base-url",
        ),
        pytest.param(
            _set(("models", "steady", "provider"), "bard"),
            "models.steady.provider",
            "Input should be",
            id="unknown-provider",
        ),
        pytest.param(
            _set(("agents", "support", "colldown"), "1m"),
            "agents.support.colldown",
            "Extra inputs are not permitted",
            id="misspelt-key",
        ),
    ],
)
def test_agents_each_mistake_gives_one_error_naming_file_key_path_and_problem(
    mutate, key_path, problem
):
    """One mistake in the file gives one ConfigError: file, key path, problem."""
    doc = copy.deepcopy(_doc())
    mutate(doc)

    with pytest.raises(ConfigError) as caught:
        parse_agents(doc, source=SOURCE)

    message = caught.value.message
    assert message.startswith(f"{SOURCE}: {key_path}: ")
    assert problem in message
    assert "; " not in message


def test_agents_non_loopback_base_url_refused_when_loopback_only():
    """With loopback_only (tests), a real provider URL is refused; loopback URLs pass."""
    doc = _doc()
    doc["models"]["steady"]["base_url"] = "https://api.openai.com/v1"

    with pytest.raises(ConfigError) as caught:
        parse_agents(doc, source=SOURCE, loopback_only=True)

    assert caught.value.message == (
        f"{SOURCE}: models.steady.base_url: only loopback URLs are allowed here"
    )
    assert parse_agents(doc, source=SOURCE).agents["support"].chain[1].base_url == (
        "https://api.openai.com/v1"
    )
    assert parse_agents(_doc(), source=SOURCE, loopback_only=True).agents["support"]


def test_agents_missing_key_variable_is_an_error_at_use():
    """A model whose api_key_env is unset loads, then fails naming file, key path and variable."""
    model = parse_agents(_doc(), source=SOURCE).agents["support"].chain[0]

    with pytest.raises(ConfigError) as caught:
        model.api_key(environ={})

    assert caught.value.message == (
        f"{SOURCE}: models.fast.api_key_env: environment variable FAST_KEY is not set"
    )
    assert model.api_key(environ={"FAST_KEY": "sk-secret-value-123"}) == "sk-secret-value-123"
    assert "sk-secret" not in repr(model)


def test_agents_several_mistakes_are_listed_in_one_error():
    """Two problems come back together in one ConfigError, each with its key path."""
    doc = _doc()
    doc["agents"]["support"]["fallbacks"] = ["nope"]
    doc["agents"]["other"] = {"model": "ghost"}

    with pytest.raises(ConfigError) as caught:
        parse_agents(doc, source=SOURCE)

    assert "agents.support.fallbacks[0]: unknown model 'nope'" in caught.value.message
    assert "agents.other.model: unknown model 'ghost'" in caught.value.message


def test_load_agents_reads_yaml_file(tmp_path):
    """A YAML file on disk loads, and errors name that file."""
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(_doc()), encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    doc = _doc()
    doc["agents"]["support"]["retries"] = -2
    bad.write_text(yaml.safe_dump(doc), encoding="utf-8")

    agents = load_agents(path)

    assert agents.source == str(path)
    assert agents.agents["support"].chain_names == ("fast", "steady")
    with pytest.raises(ConfigError, match=rf"^{bad}: agents\.support\.retries: "):
        load_agents(bad)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(None, "cannot read the agents file", id="missing"),
        pytest.param("models: [unclosed\n", "not valid YAML at line", id="not-yaml"),
        pytest.param("- a list\n", "(top level): Input should be a valid dictionary", id="list"),
        pytest.param("", "(top level): Input should be a valid dictionary", id="empty"),
    ],
)
def test_load_agents_unreadable_file_names_the_file(tmp_path, content, problem):
    """A missing, non-YAML or wrongly shaped file gives one error naming the file."""
    path = tmp_path / "agents.yaml"
    if content is not None:
        path.write_text(content, encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_agents(path)

    assert caught.value.message.startswith(f"{path}: ")
    assert problem in caught.value.message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("200ms", 0.2),
        ("30s", 30.0),
        ("1m", 60.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        (2, 2.0),
        (0.25, 0.25),
        ("9ms", 0.009),
    ],
)
def test_parse_duration_documented_spellings(text, seconds):
    """The design's spellings (200ms, 30s, 1m …) and bare numbers parse to seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "value", ["", "5", "5 s", "1d", "-1s", "s", -1, True, None, [1], float("nan"), float("inf")]
)
def test_parse_duration_rejects_non_durations(value):
    """Unitless strings, unknown units, negatives, non-finite and non-numbers are refused."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@given(st.integers(min_value=0, max_value=10**10))
def test_duration_format_then_parse_round_trips(ms):
    """format_duration's spelling of any whole number of milliseconds parses back exactly."""
    seconds = ms / 1000

    text = format_duration(seconds)

    assert parse_duration(text) == seconds
    assert format_duration(parse_duration(text)) == text
