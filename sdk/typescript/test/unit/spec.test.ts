// The SDK against api/openapi.json: (a) the committed generated types are what the generator
// makes from the document now; (b) each operation in the SDK's table is in the document with
// that method; (c) every request field and query parameter the SDK sends (recorded from a run
// of every SDK call against a fake service) is in that operation's request schema.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

import { OPERATIONS, type Operation } from "../../operations.js";
import { health, Sandbox, Snapshot } from "../../index.js";
import { FakeServer, sandboxInfo, sandboxMetrics, writeNdjson, type RecordedRequest } from "./fake-server.js";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
// EMBER_OPENAPI points the check at another copy of the document (to try a change first).
const specPath = process.env["EMBER_OPENAPI"] ?? join(root, "..", "..", "api", "openapi.json");

type Json = any; // eslint-disable-line @typescript-eslint/no-explicit-any
const spec: Json = JSON.parse(readFileSync(specPath, "utf8"));

function specOperation(op: Operation): Json | undefined {
  return spec.paths?.[op.path]?.[op.method.toLowerCase()];
}

function resolve(schema: Json): Json {
  let s = schema;
  for (let i = 0; s && s.$ref !== undefined && i < 32; i++) {
    s = spec.components.schemas[String(s.$ref).replace("#/components/schemas/", "")];
  }
  return s;
}

/** The object schemas a value may match (through $ref, oneOf/anyOf and allOf), null left out. */
function objectSchemas(schema: Json): Json[] {
  const s = resolve(schema);
  if (!s || typeof s !== "object") return [];
  const alternatives = s.oneOf ?? s.anyOf;
  if (alternatives) return alternatives.flatMap(objectSchemas);
  const parts: Json[] = [];
  if (s.properties || s.additionalProperties !== undefined || s.type === "object") parts.push(s);
  if (s.allOf) {
    for (const member of s.allOf) {
      const r = resolve(member);
      if (r.properties || r.allOf || r.oneOf) parts.push(...objectSchemas(r));
    }
  }
  return parts;
}

/** The schema of field `name` in an object schema set, if any allows it. */
function fieldSchema(schemas: Json[], name: string): Json | undefined {
  for (const s of schemas) {
    if (s.properties && s.properties[name] !== undefined) return s.properties[name];
  }
  for (const s of schemas) {
    if (s.additionalProperties && typeof s.additionalProperties === "object") return s.additionalProperties;
  }
  return undefined;
}

/** Unknown fields in `value` (recursively) per `schema`: a list of dotted paths. */
function unknownFields(value: unknown, schema: Json, at: string): string[] {
  if (value === null || typeof value !== "object" || Array.isArray(value)) return [];
  const schemas = objectSchemas(schema);
  if (schemas.length === 0) return [];
  const out: string[] = [];
  for (const [name, field] of Object.entries(value as Record<string, unknown>)) {
    const sub = fieldSchema(schemas, name);
    if (sub === undefined) out.push(`${at}.${name}`);
    else out.push(...unknownFields(field, sub, `${at}.${name}`));
  }
  return out;
}

test("(a) src/generated/api.ts is what scripts/gen-types.mjs makes from api/openapi.json", async () => {
  const generatorUrl = pathToFileURL(join(root, "scripts", "gen-types.mjs")).href;
  const generator: Json = await import(generatorUrl);
  const fresh: string = generator.generate(spec);
  const committed = readFileSync(join(root, "src", "generated", "api.ts"), "utf8");
  assert.ok(
    fresh === committed,
    "src/generated/api.ts is out of date with api/openapi.json: run `npm run gen-types` and rebuild",
  );
  // The generator covers every schema.
  for (const name of Object.keys(spec.components.schemas)) {
    assert.match(committed, new RegExp(`export (interface|type) ${name}\\b`), `no type for schema ${name}`);
  }
});

test("(b) every operation in the SDK's table is in the document with that method", () => {
  for (const [name, op] of Object.entries(OPERATIONS) as [string, Operation][]) {
    // A pending operation is checked like the others as soon as the document has it.
    const found = specOperation(op);
    assert.ok(found, `operation ${name}: ${op.method} ${op.path} is not in api/openapi.json`);
    if (op.body !== undefined) {
      const content = found.requestBody?.content?.["application/json"]?.schema;
      assert.ok(content, `operation ${name}: the document gives ${op.method} ${op.path} no JSON body`);
      const refs = [content, ...(content.oneOf ?? []), ...(content.anyOf ?? [])]
        .map((s: Json) => s.$ref)
        .filter(Boolean);
      assert.ok(
        refs.includes(`#/components/schemas/${op.body}`),
        `operation ${name}: the SDK sends ${op.body}, the document takes ${JSON.stringify(refs)}`,
      );
    }
    if (op.rawBody) {
      assert.ok(
        found.requestBody?.content?.["application/octet-stream"],
        `operation ${name}: the document takes no raw body`,
      );
    }
    const documented = new Set(
      (found.parameters ?? []).filter((p: Json) => p.in === "query").map((p: Json) => p.name as string),
    );
    for (const q of op.query ?? []) {
      assert.ok(documented.has(q), `operation ${name}: query parameter ${q} is not in the document`);
    }
    const pathParams = (found.parameters ?? []).filter((p: Json) => p.in === "path").map((p: Json) => p.name).sort();
    const ours = [...op.path.matchAll(/\{([^}]+)\}/g)].map((m) => m[1]).sort();
    assert.deepEqual(ours, pathParams, `operation ${name}: path parameters`);
  }
});

/** Runs every SDK call, with every option, against a fake service; returns its requests. */
async function exerciseSdk(): Promise<RecordedRequest[]> {
  const fake = new FakeServer();
  const socket = await fake.listenUnix();
  fake
    .on("GET", "/healthz", (_req, res) => FakeServer.json(res, 200, { status: "ok", sandboxes: 1 }))
    .on("POST", "/sandboxes", (_req, res) => FakeServer.json(res, 201, sandboxInfo("sb-1", { ports: [{ guest_port: 8080, host: "127.0.0.1:40000" }] })))
    .on("GET", "/sandboxes/{id}", (_req, res, p) => FakeServer.json(res, 200, sandboxInfo(p["id"] as string)))
    .on("GET", "/sandboxes", (_req, res) => FakeServer.json(res, 200, { sandboxes: [sandboxInfo("sb-1")] }))
    .on("DELETE", "/sandboxes/{id}", (_req, res) => {
      res.writeHead(204);
      res.end();
    })
    .on("POST", "/sandboxes/{id}/timeout", (_req, res, p) => FakeServer.json(res, 200, sandboxInfo(p["id"] as string)))
    .on("PATCH", "/sandboxes/{id}/network", (_req, res) => FakeServer.json(res, 200, { mode: "egress" }))
    .on("POST", "/sandboxes/{id}/exec", async (req, res) => {
      const body = req.json as { detach?: boolean };
      if (body.detach) {
        FakeServer.json(res, 202, {
          cmd_id: "c2",
          argv: ["sleep", "1"],
          started_unix_ms: Date.now(),
          status: "running",
          stdout_dropped_bytes: 0,
          stderr_dropped_bytes: 0,
          timed_out: false,
        });
        return;
      }
      await writeNdjson(res, [
        { type: "started", cmd_id: "c1", pid: 7 },
        { type: "stdout", data: "hi\n" },
        { type: "exit", exit_code: 0, timed_out: false, duration_ms: 1 },
      ]);
      res.end();
    })
    .on("GET", "/sandboxes/{id}/commands/{cid}/logs", async (_req, res) => {
      await writeNdjson(res, [{ type: "exit", exit_code: 0, timed_out: false, duration_ms: 1 }]);
      res.end();
    })
    .on("GET", "/sandboxes/{id}/commands/{cid}", (_req, res, p) =>
      FakeServer.json(res, 200, {
        cmd_id: p["cid"],
        argv: ["sleep", "1"],
        started_unix_ms: Date.now(),
        status: "finished",
        exit_code: 0,
        stdout: "out",
        stdout_dropped_bytes: 0,
        stderr_dropped_bytes: 0,
        timed_out: false,
      }),
    )
    .on("GET", "/sandboxes/{id}/commands", (_req, res) =>
      FakeServer.json(res, 200, {
        commands: [
          {
            cmd_id: "c1",
            argv: ["echo", "hi"],
            started_unix_ms: Date.now(),
            status: "finished",
            exit_code: 0,
            stdout_dropped_bytes: 0,
            stderr_dropped_bytes: 0,
            timed_out: false,
          },
        ],
      }),
    )
    .on("GET", "/sandboxes/{id}/metrics", (_req, res, p) => FakeServer.json(res, 200, sandboxMetrics(p["id"] as string)))
    .on("POST", "/sandboxes/{id}/commands/{cid}/kill", (_req, res, p) => FakeServer.json(res, 200, { cmd_id: p["cid"], signal: 15 }))
    .on("PUT", "/sandboxes/{id}/files", (req, res) =>
      FakeServer.json(res, 201, { path: req.query.get("path"), bytes: req.body.length, mode: "644" }),
    )
    .on("GET", "/sandboxes/{id}/files", (_req, res) => {
      res.writeHead(200, { "content-type": "application/octet-stream" });
      res.end("data");
    })
    .on("POST", "/sandboxes/{id}/files/mkdir", (req, res) => FakeServer.json(res, 201, { path: (req.json as { path: string }).path }))
    .on("POST", "/sandboxes/{id}/snapshots", (_req, res, p) =>
      FakeServer.json(res, 201, {
        id: "snap-1",
        created: new Date().toISOString(),
        created_unix_ms: Date.now(),
        memory_bytes: 1 << 28,
        memory_mib: 256,
        disks: 1,
        network: false,
        took_ms: 12,
        sandbox: sandboxInfo(p["id"] as string),
      }),
    )
    .on("GET", "/snapshots/{id}", (_req, res, p) =>
      FakeServer.json(res, 200, {
        id: p["id"],
        created: new Date().toISOString(),
        created_unix_ms: Date.now(),
        memory_bytes: 1 << 28,
        memory_mib: 256,
        disks: 1,
        network: false,
      }),
    )
    .on("DELETE", "/snapshots/{id}", (_req, res) => {
      res.writeHead(204);
      res.end();
    })
    .on("POST", "/snapshots/{id}/fork", (req, res) => {
      const count = (req.json as { count: number }).count;
      FakeServer.json(res, 201, { sandboxes: Array.from({ length: count }, (_, i) => sandboxInfo(`fork-${i}`)) });
    });
  try {
    const sandbox = await Sandbox.create({
      socket,
      runtime: "node22",
      timeout: 30_000,
      resources: { vcpus: 2, memory: 512 },
      ports: [8080],
      env: { A: "1" },
      networkPolicy: { allow: ["10.0.0.0/8"] },
    });
    await health({ socket });
    await Sandbox.create({ socket, source: { type: "snapshot", snapshotId: "snap-0" }, restoreMode: "lazy", networkPolicy: "allow-all" });
    await Sandbox.create({ socket, source: { type: "template", name: "t" }, networkPolicy: "deny-all" });
    await Sandbox.create({ socket, onTimeout: "snapshot", autoResume: false, idleTimeout: 2500 });
    await Sandbox.get("sb-1", { socket });
    await Sandbox.list({ socket });
    await sandbox.refresh();
    await sandbox.runCommand("echo", ["hi"]);
    await sandbox.runCommand({
      cmd: "echo",
      args: ["hi"],
      cwd: "/tmp",
      env: { B: "2" },
      sudo: true,
      timeout: 5000,
      stdin: Buffer.from([1, 2]),
    });
    await sandbox.runCommand({ cmd: "cat", stdin: "text" });
    const detached = await sandbox.runCommand({ cmd: "sleep", args: ["1"], detached: true });
    await detached.kill();
    await detached.wait();
    await (await sandbox.getCommand("c2")).stdout();
    await sandbox.listCommands();
    await sandbox.metrics();
    await sandbox.writeFiles([
      { path: "/tmp/a", content: "x", mode: 0o755 },
      { path: "/tmp/b", content: Buffer.from("y") },
    ]);
    await sandbox.readFileToBuffer("/tmp/a");
    await sandbox.mkDir("/tmp/d", { mode: 0o700 });
    const snapshot = await sandbox.snapshot({ name: "n", diff: true, stop: false });
    await sandbox.fork(2, { timeout: 10_000, env: { C: "3" }, ports: [80], networkPolicy: "allow-all", restoreMode: "eager" });
    await snapshot.fork(1);
    await (await Snapshot.get({ snapshotId: "snap-1", socket })).delete();
    await sandbox.extendTimeout(60_000);
    await sandbox.updateNetworkPolicy({ allow: ["*.example.com", "192.0.2.0/24"], deny: ["a.example.com"] });
    await sandbox.stop();
    return fake.requests;
  } finally {
    await fake.close();
  }
}

test("(c) every request field and query parameter the SDK sends is in the document", async () => {
  const requests = await exerciseSdk();
  const problems: string[] = [];
  const used = new Set<string>();
  for (const req of requests) {
    const match = Object.entries(OPERATIONS).find(([, op]) => {
      if (op.method !== req.method) return false;
      const pattern = new RegExp("^" + op.path.replace(/\{[^}]+\}/g, "[^/]+") + "$");
      return pattern.test(req.path);
    });
    if (!match) {
      problems.push(`${req.method} ${req.path} is not in the SDK's operation table`);
      continue;
    }
    const [name, op] = match as [string, Operation];
    used.add(name);
    const documented = specOperation(op);
    if (!documented) continue; // (b) reports it, or it is pending
    const queryNames = new Set((documented.parameters ?? []).filter((p: Json) => p.in === "query").map((p: Json) => p.name));
    for (const key of req.query.keys()) {
      if (!queryNames.has(key)) problems.push(`${name}: query parameter ${key} is not in the document`);
    }
    if (req.json !== undefined) {
      const schema = documented.requestBody?.content?.["application/json"]?.schema;
      if (!schema) problems.push(`${name}: sends a JSON body the document does not take`);
      else problems.push(...unknownFields(req.json, schema, name));
    } else if (req.body.length > 0 && !op.rawBody) {
      problems.push(`${name}: sends a body that is not JSON`);
    }
  }
  assert.deepEqual(problems, []);
  // The run covered the whole table.
  const unused = Object.keys(OPERATIONS).filter((n) => !used.has(n));
  assert.deepEqual(unused, [], "operations the exercise did not reach");
});

test("the request-field check finds a field the document lacks", () => {
  const exec = specOperation(OPERATIONS.exec);
  const schema = exec.requestBody.content["application/json"].schema;
  assert.deepEqual(unknownFields({ cmd: "x", bogus: 1 }, schema, "exec"), ["exec.bogus"]);
  const create = specOperation(OPERATIONS.createSandbox).requestBody.content["application/json"].schema;
  assert.deepEqual(unknownFields({ network: { mode: "egress", allowed: [] } }, create, "create"), ["create.network.allowed"]);
  assert.deepEqual(unknownFields({ env: { ANY: "x" }, network: { mode: "egress", allow: [] } }, create, "create"), []);
});
