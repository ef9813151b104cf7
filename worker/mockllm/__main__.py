"""``python -m worker.mockllm [--host H] [--port N] [--scenarios FILE]``.

Serves until interrupted. The port defaults to ``$PORT`` (Procfile runners set it), else
8700. A scenarios file is YAML or JSON mapping model names to step lists.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import yaml

from worker.mockllm.scenarios import scenario_from_dict
from worker.mockllm.server import MockLLM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.mockllm", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8700")))
    parser.add_argument("--scenarios", type=Path, help="YAML/JSON: model name -> steps")
    args = parser.parse_args(argv)
    mock = MockLLM(args.host, args.port)
    if args.scenarios is not None:
        try:
            data = yaml.safe_load(args.scenarios.read_text(encoding="utf-8")) or {}
            for model, steps in data.items():
                scenario = scenario_from_dict(steps)
                mock.script(str(model), scenario.steps, repeat_last=scenario.repeat_last)
        except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError) as exc:
            print(f"{args.scenarios}: {exc}", file=sys.stderr)
            return 2
    print(f"mockllm listening on {mock.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        mock.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
