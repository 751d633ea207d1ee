#!/usr/bin/env python3
"""Runs "generated" Python (say, an AI agent's tool call) in a fresh ember sandbox: a
`python3.13` sandbox with a 30 s timeout, network only when packages must be installed,
`pip install` of the packages, then `python3` on the code. Prints {stdout, stderr, exit_code}
as JSON and always stops the sandbox.

    python3 run_generated_code.py code.py [package ...]        code from a file
    python3 run_generated_code.py - requests < code.py          code from stdin
    echo '{"code": "print(1)", "packages": []}' | python3 run_generated_code.py
                                                                a tool call {code, packages}

The service: EMBER_SOCKET (a Unix socket), or EMBER_URL + EMBER_TOKEN (+ EMBER_CA_FILE).
Runs from a checkout: the SDK is imported from ../../sdk/python/src (or an installed
ember-sandbox).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../sdk/python/src"))

from ember_sandbox import EmberError, Sandbox  # noqa: E402

WORKDIR = "/home/user"  # python3.13 runs commands as `user` here
SANDBOX_TIMEOUT_MS = 30_000
CODE_TIMEOUT_MS = 20_000


def run_generated_code(code: str, packages: list[str] | None = None) -> dict[str, Any]:
    """The tool: runs ``code`` with ``packages`` installed; its output and exit code."""
    packages = list(packages or [])
    with Sandbox.create(
        runtime="python3.13",
        timeout_ms=SANDBOX_TIMEOUT_MS,
        network_policy="allow-all" if packages else None,
    ) as sandbox:
        if packages:
            install = sandbox.run_command(
                "python3",
                ["-m", "pip", "install", "--user", "--quiet", "--disable-pip-version-check",
                 "--no-warn-script-location", "--progress-bar", "off", *packages],
            )
            if install.exit_code != 0:
                return {
                    "stdout": install.stdout(),
                    "stderr": "pip install failed:\n" + install.stderr(),
                    "exit_code": install.exit_code,
                }
        sandbox.write_files([{"path": f"{WORKDIR}/main.py", "content": code}])
        result = sandbox.run_command("python3", ["main.py"], cwd=WORKDIR,
                                     timeout_ms=CODE_TIMEOUT_MS)
        answer: dict[str, Any] = {
            "stdout": result.stdout(),
            "stderr": result.stderr(),
            "exit_code": result.exit_code,
        }
        if result.signal is not None:
            answer["signal"] = result.signal
        if result.timed_out:
            answer["timed_out"] = True
        return answer


def read_request(argv: list[str]) -> tuple[str, list[str]]:
    """(code, packages) from argv (a file or `-` for stdin, then packages) or a JSON tool
    call {"code", "packages"} on stdin."""
    source, packages = (argv[0], argv[1:]) if argv else (None, [])
    if source is not None and source != "-":
        with open(source, encoding="utf-8") as f:
            return f.read(), packages
    text = sys.stdin.read()
    if source is None:
        try:
            call = json.loads(text)
        except ValueError:
            call = None  # not JSON: the code itself
        if isinstance(call, dict) and isinstance(call.get("code"), str):
            raw = call.get("packages") or []
            return call["code"], [str(p) for p in raw] if isinstance(raw, list) else []
    return text, packages


def main() -> int:
    try:
        code, packages = read_request(sys.argv[1:])
        print(json.dumps(run_generated_code(code, packages)))
    except EmberError as e:
        print(f"run_generated_code: {type(e).__name__} ({e.code}): {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"run_generated_code: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
