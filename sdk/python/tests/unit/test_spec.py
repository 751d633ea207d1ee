"""The SDK against the API's spec (api/openapi.json): the generated types are current, every
operation the SDK calls is in the spec with that method, and every request field it sends is
in the operation's request schema."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import pytest

from ember_sandbox import AllowList, Sandbox, SnapshotSource, _api_types, _core
from ember_sandbox._operations import OPERATIONS

from .fake_server import FakeService, Recorded

SDK_ROOT = Path(__file__).resolve().parents[2]
REPO_ROOT = SDK_ROOT.parents[1]
SPEC_PATH = REPO_ROOT / "api" / "openapi.json"
GENERATED = SDK_ROOT / "src" / "ember_sandbox" / "_api_types.py"


def load_gen_types() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_types", SDK_ROOT / "scripts" / "gen_types.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_types"] = module
    spec.loader.exec_module(module)
    return module


def load_spec() -> dict[str, Any]:
    with open(SPEC_PATH, encoding="utf-8") as f:
        spec: dict[str, Any] = json.load(f)
    return spec


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def properties(spec: dict[str, Any], schema: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The properties an object schema allows (``None``: not an object with properties)."""
    schema = resolve(spec, schema)
    found: dict[str, Any] = {}
    is_object = False
    for key in ("oneOf", "anyOf", "allOf"):
        for part in schema.get(key, []):
            if "if" in part or "then" in part:
                continue
            sub = properties(spec, part)
            if sub is not None:
                is_object = True
                found.update(sub)
    if "properties" in schema:
        is_object = True
        found.update(schema["properties"])
    return found if is_object else None


def check_value(spec: dict[str, Any], schema: dict[str, Any], value: Any, where: str) -> None:
    """Fails when ``value`` has a field ``schema`` (recursively) does not."""
    schema = resolve(spec, schema)
    if isinstance(value, dict):
        props = properties(spec, schema)
        if props is None:
            return  # a map (env): any key
        for key, item in value.items():
            assert key in props, f"{where}: the SDK sends {key!r}, which the spec does not have"
            check_value(spec, props[key], item, f"{where}.{key}")
    elif isinstance(value, list):
        items = schema.get("items")
        if items is None:
            for variant in schema.get("oneOf", []):
                items = resolve(spec, variant).get("items") or items
        for index, item in enumerate(value):
            if items is not None:
                check_value(spec, items, item, f"{where}[{index}]")


def request_schema(spec: dict[str, Any], method: str, path: str) -> Optional[dict[str, Any]]:
    operation = spec["paths"][path][method.lower()]
    body = operation.get("requestBody")
    if body is None or "application/json" not in body["content"]:
        return None
    schema: dict[str, Any] = body["content"]["application/json"]["schema"]
    variants: list[dict[str, Any]] = [
        v for v in schema.get("oneOf", [schema]) if v.get("type") != "null"
    ]
    assert len(variants) == 1, f"{method} {path}: an unexpected request schema"
    return variants[0]


# --- (a) the generated types -------------------------------------------------------------------


def test_the_generated_types_are_what_the_spec_makes_now() -> None:
    gen = load_gen_types()
    expected = gen.generate(SPEC_PATH)
    committed = GENERATED.read_text(encoding="utf-8")
    assert committed == expected, (
        "src/ember_sandbox/_api_types.py is stale: run `python3 scripts/gen_types.py` in "
        "sdk/python"
    )


def test_the_generator_check_mode_agrees() -> None:
    gen = load_gen_types()
    assert gen.main(["--check"]) == 0


def test_every_schema_has_a_type() -> None:
    spec = load_spec()
    for name in spec["components"]["schemas"]:
        assert hasattr(_api_types, name), name


def test_typed_dicts_have_the_schemas_fields_and_required_keys() -> None:
    spec = load_spec()
    for name in ("CreateBody", "ExecBody", "KillBody", "MkdirBody", "SnapshotBody", "ForkBody",
                 "TimeoutBody", "SandboxInfo", "CommandInfo"):
        typed = getattr(_api_types, name)
        schema = resolve(spec, spec["components"]["schemas"][name])
        props = properties(spec, schema) or {}
        keys = set(typed.__required_keys__) | set(typed.__optional_keys__)
        assert keys == set(props), name
        required: set[str] = set(schema.get("required", []))
        for part in schema.get("allOf", []):
            required |= set(resolve(spec, part).get("required", []))
        assert set(typed.__required_keys__) == required, name


# --- (b) the operations table -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_each_operation_is_in_the_spec_with_its_method(name: str) -> None:
    spec = load_spec()
    op = OPERATIONS[name]  # type: ignore[index]
    assert op.path in spec["paths"], f"{name}: {op.path} is not in api/openapi.json"
    methods = spec["paths"][op.path]
    assert op.method.lower() in methods, f"{name}: {op.path} has no {op.method} in the spec"
    operation = methods[op.method.lower()]
    params = {p["name"]: p for p in operation.get("parameters", [])}
    for template in re.findall(r"{(\w+)}", op.path):
        assert params.get(template, {}).get("in") == "path", f"{name}: path parameter {template}"
    for query in op.query:
        assert params.get(query, {}).get("in") == "query", f"{name}: no query parameter {query}"
    schema = request_schema(spec, op.method, op.path)
    content = operation.get("requestBody", {}).get("content", {})
    if op.raw_body is not None:
        assert op.raw_body in content, f"{name}: the spec takes no {op.raw_body} body"
    if op.body is None:
        assert schema is None, f"{name}: the spec takes a JSON body the table does not name"
    else:
        assert schema is not None, f"{name}: the spec takes no JSON body"
        assert schema.get("$ref", "").endswith("/" + op.body), (
            f"{name}: the spec's body is {schema}, the table says {op.body}"
        )


# --- (c) the fields the SDK sends -------------------------------------------------------------


def test_the_body_builders_send_only_spec_fields() -> None:
    spec = load_spec()
    schemas = spec["components"]["schemas"]
    bodies: list[tuple[str, Any]] = [
        (
            "CreateBody",
            _core.create_body(
                runtime="python3.13",
                timeout_ms=1500,
                vcpus=2,
                memory_mib=512,
                ports=[8000],
                env={"A": "1"},
                source=SnapshotSource("snap-1"),
                network_policy=AllowList(["10.0.0.0/8", "*.example.com"], deny=["a.example.com"]),
                restore_mode="lazy",
                on_timeout="snapshot",
                auto_resume=False,
                idle_timeout_ms=2500,
            ),
        ),
        ("CreateBody", _core.create_body(source={"type": "template", "name": "t"})),
        (
            "ExecBody",
            _core.exec_body(
                "sh", ["-c", "x"], env={"A": "1"}, cwd="/tmp", sudo=True, detached=True,
                stdin=b"\xff", timeout_ms=10,
            ),
        ),
        ("ExecBody", _core.exec_body("cat", stdin="text", user="user")),
        ("KillBody", _core.kill_body("SIGTERM")),
        ("MkdirBody", _core.mkdir_body("/a/b", 0o700)),
        ("SnapshotBody", _core.snapshot_body("name", stop=True)),
        ("TimeoutBody", _core.timeout_body(30)),
        (
            "ForkBody",
            _core.fork_body(
                2, timeout_ms=1000, env={"A": "1"}, ports=[80], network={"mode": "egress"}
            ),
        ),
    ]
    for name, body in bodies:
        check_value(spec, schemas[name], body, name)


def operation_of(recorded: Recorded) -> Optional[str]:
    for name, op in OPERATIONS.items():
        pattern = re.sub(r"{\w+}", "[^/]+", op.path)
        if op.method == recorded.method and re.fullmatch(pattern, recorded.path):
            return name
    return None


def test_every_request_the_sdk_makes_has_only_spec_fields(service: FakeService) -> None:
    """Drives every method with every option against the fake and checks what went out."""
    spec = load_spec()
    with Sandbox.create(
        runtime="base",
        timeout_ms=60_000,
        vcpus=1,
        memory_mib=256,
        ports=[8000],
        env={"A": "1"},
        network_policy="allow-all",
        on_timeout="pause",
        auto_resume=True,
        idle_timeout_ms=5000,
    ) as sb:
        sb.run_command("echo", ["hi"], env={"B": "2"}, cwd="/tmp", sudo=True, stdin=b"\x00",
                       timeout_ms=5000, on_stdout=io.BytesIO())
        cancel = threading.Event()
        cancel.set()
        sb.run_command("sleep", ["5"], cancel=cancel, kill_signal="SIGTERM")
        cmd = sb.run_command("echo", ["x"], detached=True)
        cmd.wait()
        cmd.info()
        sb.list_commands()
        sb.metrics()
        sb.write_files([{"path": "/tmp/a", "content": b"1", "mode": 0o600}, ("/new/b", "2")])
        sb.write_files([("/streamed/c", io.BytesIO(b"3"))])
        assert sb.read_file_bytes("/tmp/a") == b"1"
        sb.mk_dir("/d", mode="750")
        sb.extend_timeout(1000)
        sb.update_network_policy(AllowList(["*.example.com", "192.0.2.0/24"], deny=["a.example.com"]))
        sb.update_network_policy("allow-all")
        snap = sb.snapshot("named")
        clones = sb.fork(1, timeout_ms=2000)
        for clone in clones:
            clone.stop()
        with Sandbox.create(source=snap) as restored:
            restored.run_command("echo")
    seen = set()
    for recorded in service.requests:
        name = operation_of(recorded)
        assert name is not None, f"{recorded.method} {recorded.path} is not in the table"
        seen.add(name)
        op = OPERATIONS[name]  # type: ignore[index]
        for key in recorded.query:
            assert key in op.query, f"{name}: query parameter {key}"
        schema = request_schema(spec, op.method, op.path)
        if recorded.headers.get("content-type", "").startswith("application/json"):
            assert schema is not None, f"{name}: a JSON body the spec does not take"
            check_value(spec, schema, recorded.json(), name)
    assert {"create_sandbox", "exec", "kill_command", "command_logs", "put_file", "get_file",
            "mkdir", "set_timeout", "create_snapshot", "fork", "delete_sandbox",
            "list_commands", "get_command", "sandbox_metrics"} <= seen


# --- the type checker refuses fields the spec lacks -------------------------------------------


def test_mypy_refuses_a_field_the_spec_does_not_have() -> None:
    api = pytest.importorskip("mypy.api")
    snippet = textwrap.dedent(
        """
        from ember_sandbox._api_types import CreateBody, ExecBody

        good: CreateBody = {"runtime": "base", "timeout_s": 30}
        ok: ExecBody = {"cmd": "ls", "args": ["-l"]}
        bad: CreateBody = {"runtime": "base", "no_such_field": 1}
        """
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "snippet.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(snippet)
        env_path = os.environ.get("MYPYPATH")
        os.environ["MYPYPATH"] = str(SDK_ROOT / "src")
        try:
            stdout, stderr, status = api.run(
                ["--strict", "--cache-dir", os.devnull, "--no-error-summary", path]
            )
        finally:
            if env_path is None:
                del os.environ["MYPYPATH"]
            else:
                os.environ["MYPYPATH"] = env_path
    assert status == 1, stdout + stderr
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "no_such_field" in errors[0], stdout
