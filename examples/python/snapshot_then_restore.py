#!/usr/bin/env python3
"""Pays for `pip install` once: the first request boots a `python3.13` sandbox, installs the
packages and runs the code; the sandbox is then snapshotted, and every later request is a
sandbox restored from that snapshot (the installed packages and all) that only runs the code.
Prints, per request, the time taken and the time saved versus the first.

    python3 snapshot_then_restore.py [requests=3] [package ...]   (default: python-dateutil)

The service: EMBER_SOCKET (a Unix socket), or EMBER_URL + EMBER_TOKEN (+ EMBER_CA_FILE).
Runs from a checkout: the SDK is imported from ../../sdk/python/src.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../sdk/python/src"))

from ember_sandbox import EmberError, Sandbox, Snapshot, SnapshotSource  # noqa: E402

WORKDIR = "/home/user"

# The import names of a few packages whose distribution name differs.
IMPORT_NAMES = {"python-dateutil": "dateutil", "pyyaml": "yaml", "beautifulsoup4": "bs4",
                "scikit-learn": "sklearn", "pillow": "PIL"}


def import_name(requirement: str) -> str:
    name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


def code_for(n: int, packages: list[str]) -> str:
    """The "generated" program of request ``n``: imports each package, does a little work."""
    modules = [import_name(p) for p in packages]
    return "\n".join([
        "import importlib",
        f"for name in {json.dumps(modules)}:",
        "    module = importlib.import_module(name)",
        "    print(name, getattr(module, '__version__', 'imported'))",
        f"print('request {n}: 44 * 44 =', 44 * 44)",
    ])


def answer(sandbox: Sandbox, n: int, packages: list[str]) -> str:
    sandbox.write_files([(f"{WORKDIR}/request.py", code_for(n, packages))])
    result = sandbox.run_command("python3", ["request.py"], cwd=WORKDIR)
    if result.exit_code != 0:
        raise RuntimeError(f"request {n} failed ({result.exit_code}): {result.stderr()}")
    return result.stdout().strip()


def ms_since(start: float) -> int:
    return round((time.monotonic() - start) * 1000)


def indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


def main() -> int:
    args = sys.argv[1:]
    try:
        requests = int(args[0]) if args else 3
    except ValueError:
        requests = 0
    if requests < 1:
        print("usage: snapshot_then_restore.py [requests=3] [package ...]", file=sys.stderr)
        return 2
    packages = args[1:] or ["python-dateutil"]
    snapshot: Snapshot | None = None
    live: list[Sandbox] = []
    try:
        # Request 1: boot, install, run.
        start = time.monotonic()
        first = Sandbox.create(runtime="python3.13", timeout_ms=600_000,
                               network_policy="allow-all")
        live.append(first)
        install = first.run_command(
            "python3",
            ["-m", "pip", "install", "--user", "--quiet", "--disable-pip-version-check",
             "--no-warn-script-location", "--progress-bar", "off", *packages],
        )
        if install.exit_code != 0:
            raise RuntimeError(f"pip install failed: {install.stderr()}")
        output = answer(first, 1, packages)
        first_ms = ms_since(start)
        print(f"request 1: {first_ms} ms (boot + pip install {' '.join(packages)} + run)")
        print(indent(output))

        # Snapshot it once (stopping it): memory, disk and the installed packages.
        start = time.monotonic()
        snapshot = first.snapshot(stop=True)
        print(f"snapshot {snapshot.snapshot_id}: {ms_since(start)} ms (once, not counted per "
              "request)")
        first.stop()  # stopped by the snapshot already: this forgets it
        live.remove(first)
        first.close()

        # Requests 2..N+1: a restore each, then only the code.
        saved = []
        for n in range(2, requests + 2):
            start = time.monotonic()
            with Sandbox.create(source=SnapshotSource(snapshot.snapshot_id),
                                timeout_ms=60_000) as sandbox:
                live.append(sandbox)
                out = answer(sandbox, n, packages)
                took = ms_since(start)
                live.remove(sandbox)
            saved.append(first_ms - took)
            print(f"request {n}: {took} ms (restore + run), saved {first_ms - took} ms vs the "
                  "first")
            print(indent(out))
        print(f"time saved per request: {round(sum(saved) / len(saved))} ms on average")
    except (EmberError, RuntimeError) as e:
        print(f"snapshot_then_restore: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        for sandbox in live:
            try:
                sandbox.stop()
            except EmberError:
                pass
        if snapshot is not None:
            try:
                snapshot.delete()
            except EmberError as e:
                print(f"could not delete {snapshot.snapshot_id}: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
