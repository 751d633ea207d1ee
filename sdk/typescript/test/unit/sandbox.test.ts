import { test, before, after, beforeEach } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { Readable, Writable } from "node:stream";
import type { ServerResponse } from "node:http";

import {
  Command,
  CommandFinished,
  ConflictError,
  ConnectionError,
  EmberError,
  NotFoundError,
  ProtocolError,
  Sandbox,
  createBody,
  execBody,
  msToSeconds,
  networkFromPolicy,
  resumedFrom,
  signalNumber,
  type CommandInfo,
  type SandboxMetrics,
} from "../../index.js";
import { readBody } from "../../connection.js";
import { FakeServer, sandboxInfo, sandboxMetrics, writeNdjson, type RecordedRequest } from "./fake-server.js";

let fake: FakeServer;
let socket: string;
let sandbox: Sandbox;

/** Per-test exec behaviour. */
let onExec: (req: RecordedRequest, res: ServerResponse) => Promise<void> = async () => undefined;
let onKill: (req: RecordedRequest, res: ServerResponse, cid: string) => void = (_req, res, cid) =>
  FakeServer.json(res, 200, { cmd_id: cid, signal: 9 });
let onLogs: ((req: RecordedRequest, res: ServerResponse) => Promise<void>) | undefined;
let commandInfo: () => Record<string, unknown> = () => ({});
/** Fields of sb-1's SandboxInfo as `GET /sandboxes/sb-1` shows it, per test. */
let infoOverrides: Record<string, unknown> = {};
/** Headers of the `GET …/commands…` answers, per test. */
let commandsHeaders: Record<string, string> = {};
const files = new Map<string, Buffer>();
const ports = [{ guest_port: 3000, host: "127.0.0.1:40000" }];

const started = { type: "started", cmd_id: "c1", pid: 10 };
const exit0 = { type: "exit", exit_code: 0, signal: null, timed_out: false, duration_ms: 3 };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

before(async () => {
  fake = new FakeServer();
  socket = await fake.listenUnix();
  fake
    .on("POST", "/sandboxes", (req, res) => {
      const body = (req.json ?? {}) as { ports?: number[] };
      FakeServer.json(
        res,
        201,
        sandboxInfo("sb-1", { ports: (body.ports ?? []).map((p, i) => ({ guest_port: p, host: `127.0.0.1:${40000 + i}` })) }),
      );
    })
    .on("GET", "/sandboxes/{id}", (_req, res, p) => {
      if (p["id"] === "sb-1")
        FakeServer.json(res, 200, sandboxInfo("sb-1", { ports, timeout_at_unix_ms: Date.now() + 10_000, ...infoOverrides }));
      else FakeServer.error(res, 404, "not_found", `no sandbox "${p["id"]}"`);
    })
    .on("DELETE", "/sandboxes/{id}", (_req, res, p) => {
      if (p["id"] !== "sb-1") return FakeServer.error(res, 404, "not_found", `no sandbox "${p["id"]}"`);
      res.writeHead(204);
      res.end();
    })
    .on("POST", "/sandboxes/{id}/timeout", (req, res) => {
      const t = (req.json as { timeout_s: number }).timeout_s;
      FakeServer.json(res, 200, sandboxInfo("sb-1", { ports, timeout_at_unix_ms: Date.now() + t * 1000 }));
    })
    .on("PATCH", "/sandboxes/{id}/network", (req, res) => {
      FakeServer.json(res, 200, { mode: "egress", ...(req.json as object) });
    })
    .on("POST", "/sandboxes/{id}/exec", (req, res) => onExec(req, res))
    .on("POST", "/sandboxes/{id}/commands/{cid}/kill", (req, res, p) => onKill(req, res, p["cid"] as string))
    .on("GET", "/sandboxes/{id}/commands/{cid}/logs", async (req, res) => {
      if (onLogs) await onLogs(req, res);
      else FakeServer.error(res, 404, "not_found", "no such endpoint");
    })
    .on("GET", "/sandboxes/{id}/commands/{cid}", (_req, res, p) =>
      FakeServer.json(
        res,
        200,
        {
          cmd_id: p["cid"],
          argv: ["x"],
          started_unix_ms: 1,
          status: "running",
          stdout_dropped_bytes: 0,
          stderr_dropped_bytes: 0,
          timed_out: false,
          ...commandInfo(),
        },
        commandsHeaders,
      ),
    )
    .on("GET", "/sandboxes/{id}/commands", (_req, res) =>
      FakeServer.json(
        res,
        200,
        {
          commands: [
            { ...detachedInfo, cmd_id: "c1", status: "finished", exit_code: 0, duration_ms: 4 },
            { ...detachedInfo, cmd_id: "c2" },
          ],
        },
        commandsHeaders,
      ),
    )
    .on("GET", "/sandboxes/{id}/metrics", (_req, res, p) => {
      if (p["id"] !== "sb-1") return FakeServer.error(res, 404, "not_found", `no sandbox "${p["id"]}"`);
      FakeServer.json(res, 200, sandboxMetrics("sb-1"));
    })
    .on("PUT", "/sandboxes/{id}/files", (req, res) => {
      const path = req.query.get("path") as string;
      files.set(path, req.body);
      FakeServer.json(res, 201, { path, bytes: req.body.length, mode: req.query.get("mode") ?? "644" });
    })
    .on("GET", "/sandboxes/{id}/files", (req, res, p) => {
      if (p["id"] !== "sb-1") return FakeServer.error(res, 404, "not_found", `no sandbox "${p["id"]}"`);
      const content = files.get(req.query.get("path") as string);
      if (!content) return FakeServer.error(res, 404, "not_found", `reading ${req.query.get("path")}: no such file`);
      res.writeHead(200, { "content-type": "application/octet-stream", "x-file-size": String(content.length) });
      // Streamed in pieces.
      for (let i = 0; i < content.length; i += 65536) res.write(content.subarray(i, i + 65536));
      res.end();
    })
    .on("POST", "/sandboxes/{id}/files/mkdir", (req, res) => FakeServer.json(res, 201, { path: (req.json as { path: string }).path }));
  sandbox = await Sandbox.create({ socket, ports: [3000] });
});

after(() => fake.close());

beforeEach(() => {
  onLogs = undefined;
  commandInfo = () => ({});
  infoOverrides = {};
  commandsHeaders = {};
  onKill = (_req, res, cid) => FakeServer.json(res, 200, { cmd_id: cid, signal: 9 });
});

test("create options map to the API's body (ms -> s rounded up, MiB, network, source)", () => {
  assert.deepEqual(
    createBody({
      runtime: "node22",
      timeout: 4001,
      resources: { vcpus: 2, memory: 1024 },
      ports: [80],
      env: { A: "b" },
      networkPolicy: "allow-all",
      socket: "/ignored",
    }),
    { runtime: "node22", timeout_s: 5, vcpus: 2, memory_mib: 1024, ports: [80], env: { A: "b" }, network: { mode: "egress" } },
  );
  assert.deepEqual(createBody({ source: { type: "snapshot", snapshotId: "s1" }, restoreMode: "lazy" }), {
    snapshot: "s1",
    restore_mode: "lazy",
  });
  assert.deepEqual(createBody({ source: { type: "template", name: "py" } }), { template: "py" });
  assert.deepEqual(createBody(), {});
  assert.deepEqual(networkFromPolicy("deny-all"), { mode: "none" });
  assert.deepEqual(networkFromPolicy({ allow: ["10.0.0.0/8"] }), { mode: "egress", allow: ["10.0.0.0/8"] });
  assert.equal(networkFromPolicy(undefined), undefined);
  assert.deepEqual(networkFromPolicy({ allow: ["*.example.com"], deny: ["a.example.com"] }), {
    mode: "egress",
    allow: ["*.example.com"],
    deny: ["a.example.com"],
  });
  assert.deepEqual(networkFromPolicy({ deny: ["10.0.0.0/8"] }), { mode: "egress", deny: ["10.0.0.0/8"] });
  assert.throws(() => networkFromPolicy({} as never), TypeError);
  assert.equal(msToSeconds(1), 1);
  assert.equal(msToSeconds(30_000), 30);
  assert.throws(() => msToSeconds(0), TypeError);
});

test("runCommand options map to the exec body (sudo -> user root)", () => {
  assert.deepEqual(execBody({ cmd: "ls", args: ["-l"], cwd: "/tmp", env: { X: "1" }, sudo: true, detached: true }), {
    cmd: "ls",
    args: ["-l"],
    cwd: "/tmp",
    env: { X: "1" },
    user: "root",
    detach: true,
  });
  assert.deepEqual(execBody({ cmd: "cat", stdin: Buffer.from([0xff]) }), { cmd: "cat", stdin_base64: "/w==" });
  assert.deepEqual(execBody({ cmd: "cat", stdin: "hi", timeout: 1500 }), { cmd: "cat", stdin: "hi", timeout_s: 2 });
  assert.throws(() => execBody({ cmd: "" }), TypeError);
  assert.equal(signalNumber("SIGKILL"), 9);
  assert.equal(signalNumber("term"), 15);
  assert.equal(signalNumber("SIGUSR1"), 10); // Linux's number on every client platform
  assert.throws(() => signalNumber("SIGNOPE"), TypeError);
});

test("runCommand streams: sinks get output as it arrives, CommandFinished has it all", async () => {
  const lines = ["1\n", "2\n", "3\n", "4\n", "5\n"];
  onExec = async (req, res) => {
    assert.deepEqual(req.json, { cmd: "sh", args: ["-c", "for i in 1 2 3 4 5; do echo $i; sleep 0.2; done"] });
    await writeNdjson(res, [started]);
    for (const line of lines) {
      // Each record cut in three pieces, sent apart.
      await writeNdjson(res, [{ type: "stdout", data: line }], { splitEvery: 7, delayMs: 5 });
      await sleep(30);
    }
    await writeNdjson(res, [{ type: "stderr", data: "warn\n" }, exit0]);
    res.end();
  };
  const arrivals: { text: string; at: number }[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      arrivals.push({ text: chunk.toString(), at: Date.now() });
      cb();
    },
  });
  const result = await sandbox.runCommand({
    cmd: "sh",
    args: ["-c", "for i in 1 2 3 4 5; do echo $i; sleep 0.2; done"],
    stdout: sink,
  });
  const end = Date.now();
  assert.ok(result instanceof CommandFinished);
  assert.equal(result.exitCode, 0);
  assert.equal(result.signal, null);
  assert.equal(result.cmdId, "c1");
  assert.equal(result.pid, 10);
  assert.equal(await result.stdout(), lines.join(""));
  assert.equal(await result.stderr(), "warn\n");
  assert.deepEqual(
    arrivals.map((a) => a.text),
    lines,
  );
  // The first line arrived well before the end.
  assert.ok(end - (arrivals[0] as { at: number }).at >= 100, `first at ${(arrivals[0] as { at: number }).at}, end ${end}`);
  const logs: string[] = [];
  for await (const line of result.logs()) logs.push(`${line.stream}:${line.data}`);
  assert.deepEqual(logs, [...lines.map((l) => `stdout:${l}`), "stderr:warn\n"]);
});

test("non-UTF-8 output (base64 records) survives byte for byte", async () => {
  onExec = async (_req, res) => {
    await writeNdjson(
      res,
      [
        started,
        { type: "stdout", data_base64: Buffer.from([0xff, 0xfe]).toString("base64") },
        { type: "stdout", data: "abc" },
        exit0,
      ],
      { splitEvery: 5 },
    );
    res.end();
  };
  const result = await sandbox.runCommand("printf", ["\\377\\376abc"]);
  assert.deepEqual(await result.stdoutBytes(), Buffer.from([0xff, 0xfe, 0x61, 0x62, 0x63]));
  assert.equal(await result.stdout(), "\ufffd\ufffdabc");
});

test("aborting the signal POSTs kill (SIGKILL) for the command; it finishes with signal 9", async () => {
  let killed: RecordedRequest | undefined;
  let finish: (() => void) | undefined;
  onExec = async (_req, res) => {
    await writeNdjson(res, [started]);
    await new Promise<void>((resolve) => (finish = resolve));
    await writeNdjson(res, [{ type: "exit", exit_code: null, signal: 9, timed_out: false, duration_ms: 100 }]);
    res.end();
  };
  onKill = (req, res, cid) => {
    killed = req;
    FakeServer.json(res, 200, { cmd_id: cid, signal: 9 });
    finish?.();
  };
  const controller = new AbortController();
  setTimeout(() => controller.abort(), 50);
  const result = await sandbox.runCommand("sleep", ["60"], { signal: controller.signal });
  assert.equal(killed?.path, "/sandboxes/sb-1/commands/c1/kill");
  assert.deepEqual(killed?.json, { signal: 9 });
  assert.equal(result.exitCode, null);
  assert.equal(result.signal, 9);
});

test("an abort before the command started kills it as soon as it starts; killSignal is used", async () => {
  let killedWith: unknown;
  let finish: (() => void) | undefined;
  onExec = async (_req, res) => {
    await sleep(80); // the abort comes before the answer
    await writeNdjson(res, [started]);
    await new Promise<void>((resolve) => (finish = resolve));
    await writeNdjson(res, [{ type: "exit", exit_code: null, signal: 15, timed_out: false, duration_ms: 100 }]);
    res.end();
  };
  onKill = (req, res, cid) => {
    killedWith = req.json;
    FakeServer.json(res, 200, { cmd_id: cid, signal: 15 });
    finish?.();
  };
  const controller = new AbortController();
  setTimeout(() => controller.abort(), 20);
  const result = await sandbox.runCommand({ cmd: "sleep", args: ["60"], signal: controller.signal, killSignal: "SIGTERM" });
  assert.deepEqual(killedWith, { signal: 15 });
  assert.equal(result.signal, 15);
});

test("a kill that finds the command finished (409) is fine: the exit record follows", async () => {
  let finish: (() => void) | undefined;
  onExec = async (_req, res) => {
    await writeNdjson(res, [started]);
    await new Promise<void>((resolve) => (finish = resolve));
    await writeNdjson(res, [exit0]);
    res.end();
  };
  onKill = (_req, res) => {
    FakeServer.error(res, 409, "conflict", "command c1 has already finished");
    finish?.();
  };
  const controller = new AbortController();
  setTimeout(() => controller.abort(), 20);
  const result = await sandbox.runCommand("true", [], { signal: controller.signal });
  assert.equal(result.exitCode, 0);
});

test("an already aborted signal rejects without starting anything", async () => {
  const before = fake.requests.length;
  await assert.rejects(sandbox.runCommand("true", [], { signal: AbortSignal.abort() }), { name: "AbortError" });
  assert.equal(fake.requests.length, before);
});

test("a stream cut before the exit record is a ProtocolError", async () => {
  onExec = async (_req, res) => {
    await writeNdjson(res, [started, { type: "stdout", data: "partial" }]);
    res.end();
  };
  await assert.rejects(sandbox.runCommand("x"), (e: unknown) => e instanceof ProtocolError && e.code === "incomplete_stream");
});

test("a connection reset in the middle of the stream is a ConnectionError", async () => {
  onExec = async (_req, res) => {
    await writeNdjson(res, [started, { type: "stdout", data: "partial" }]);
    await sleep(20);
    res.socket?.destroy();
  };
  await assert.rejects(sandbox.runCommand("x"), (e: unknown) => e instanceof ConnectionError && /connection broke/.test(e.message));
});

test("exec errors map to typed errors (409 on a stopped sandbox)", async () => {
  onExec = async (_req, res) => FakeServer.error(res, 409, "conflict", "sandbox sb-1 is stopped");
  await assert.rejects(sandbox.runCommand("x"), ConflictError);
});

const detachedInfo = {
  cmd_id: "c9",
  argv: ["sh", "-c", "x"],
  pid: 99,
  started_unix_ms: 1000,
  status: "running",
  stdout_dropped_bytes: 0,
  stderr_dropped_bytes: 0,
  timed_out: false,
};

test("detached: a Command at once; logs() follows it; wait() gives a CommandFinished; kill() sends SIGTERM", async () => {
  onExec = async (req, res) => {
    assert.equal((req.json as { detach?: boolean }).detach, true);
    FakeServer.json(res, 202, detachedInfo);
  };
  onLogs = async (_req, res) => {
    await writeNdjson(res, [
      { type: "stdout", data: "a\n" },
      { type: "stderr", data: "b\n" },
      { type: "stdout", data_base64: Buffer.from([0xff]).toString("base64") },
    ]);
    await sleep(20);
    await writeNdjson(res, [{ type: "exit", exit_code: 3, signal: null, timed_out: false, duration_ms: 5 }]);
    res.end();
  };
  const command = await sandbox.runCommand({ cmd: "sh", args: ["-c", "x"], detached: true });
  assert.ok(command instanceof Command);
  assert.ok(!(command instanceof CommandFinished));
  assert.equal(command.cmdId, "c9");
  assert.equal(command.pid, 99);
  assert.equal(command.exitCode, null);
  const seen: string[] = [];
  for await (const line of command.logs()) seen.push(`${line.stream}:${line.bytes.toString("hex")}`);
  assert.deepEqual(seen, ["stdout:610a", "stderr:620a", "stdout:ff"]);
  const done = await command.wait();
  assert.equal(done.exitCode, 3);
  assert.deepEqual(await done.stdoutBytes(), Buffer.from([0x61, 0x0a, 0xff]));
  assert.equal(await done.stderr(), "b\n");
  let killBody: unknown;
  onKill = (req, res, cid) => {
    killBody = req.json;
    FakeServer.json(res, 200, { cmd_id: cid, signal: 15 });
  };
  await command.kill();
  assert.deepEqual(killBody, { signal: 15 });
  await command.kill("SIGINT");
  assert.deepEqual(killBody, { signal: 2 });
});

test("detached stdout() is the output kept so far (text or base64)", async () => {
  onExec = async (_req, res) => FakeServer.json(res, 202, detachedInfo);
  const command = await sandbox.runCommand({ cmd: "x", detached: true });
  commandInfo = () => ({ stdout: "so far", stderr_base64: Buffer.from([0xfe]).toString("base64") });
  assert.equal(await command.stdout(), "so far");
  assert.deepEqual(await command.stderrBytes(), Buffer.from([0xfe]));
});

test("without the logs endpoint, wait() and logs() poll the command (no byte lost or repeated)", async () => {
  onExec = async (_req, res) => FakeServer.json(res, 202, detachedInfo);
  const command = await sandbox.runCommand({ cmd: "x", detached: true });
  let polls = 0;
  commandInfo = () => {
    polls++;
    if (polls === 1) return { stdout: "ab" };
    // The oldest byte was dropped from what is kept.
    if (polls === 2) return { stdout: "bcd", stdout_dropped_bytes: 1 };
    return { stdout: "bcde", stdout_dropped_bytes: 1, status: "finished", exit_code: 0 };
  };
  const done = await command.wait();
  assert.equal(await done.stdout(), "abcde");
  assert.equal(done.exitCode, 0);
});

test("a detached run's sinks and abort signal work too", async () => {
  onExec = async (_req, res) => FakeServer.json(res, 202, detachedInfo);
  onLogs = async (_req, res) => {
    await writeNdjson(res, [{ type: "stdout", data: "x" }, exit0]);
    res.end();
  };
  const got: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _e, cb) {
      got.push(chunk.toString());
      cb();
    },
  });
  let killed: unknown;
  onKill = (req, res, cid) => {
    killed = req.json;
    FakeServer.json(res, 200, { cmd_id: cid, signal: 9 });
  };
  const controller = new AbortController();
  await sandbox.runCommand({ cmd: "x", detached: true, stdout: sink, signal: controller.signal });
  controller.abort();
  for (let i = 0; i < 50 && (got.length === 0 || killed === undefined); i++) await sleep(10);
  assert.deepEqual(got, ["x"]);
  assert.deepEqual(killed, { signal: 9 });
});

test("writeFiles streams each file (string, Buffer, Readable, mode); readFile streams it back", async () => {
  const big = randomBytes(3 * 1024 * 1024 + 17);
  await sandbox.writeFiles([
    { path: "/tmp/text", content: "héllo" },
    { path: "/tmp/bin", content: new Uint8Array([0, 255, 1]), mode: 0o755 },
    { path: "/tmp/big", content: Readable.from((function* () {
      for (let i = 0; i < big.length; i += 100_000) yield big.subarray(i, i + 100_000);
    })()), mode: "600" },
  ]);
  const puts = fake.requests.filter((r) => r.method === "PUT");
  const modes = puts.slice(-3).map((r) => r.query.get("mode"));
  assert.deepEqual(modes, [null, "755", "600"]);
  assert.equal(puts.at(-1)?.headers["transfer-encoding"], "chunked");
  assert.equal(puts.at(-3)?.headers["content-length"], String(Buffer.byteLength("héllo")));
  assert.equal((await sandbox.readFileToBuffer("/tmp/text"))?.toString(), "héllo");
  assert.deepEqual(await sandbox.readFileToBuffer({ path: "/tmp/bin" }), Buffer.from([0, 255, 1]));
  const stream = await sandbox.readFile("/tmp/big");
  assert.ok(stream);
  const hash = createHash("sha256");
  for await (const chunk of stream) hash.update(chunk as Buffer);
  assert.equal(hash.digest("hex"), createHash("sha256").update(big).digest("hex"));
});

test("readFile: null for a missing file, NotFoundError for a missing sandbox", async () => {
  assert.equal(await sandbox.readFile("/no/such/file"), null);
  const gone = new Sandbox(sandbox.connection, { ...sandbox.info, id: "gone" });
  await assert.rejects(gone.readFile("/tmp/text"), NotFoundError);
});

test("mkDir sends the path and mode", async () => {
  await sandbox.mkDir("/tmp/a/b", { mode: 0o700 });
  assert.deepEqual(fake.requests.at(-1)?.json, { path: "/tmp/a/b", mode: 0o700 });
});

test("extendTimeout adds to the service's deadline (rounded up to seconds)", async () => {
  await sandbox.extendTimeout(5000);
  const body = fake.requests.at(-1)?.json as { timeout_s: number };
  // The fake's deadline is 10 s away: 10 + 5, maybe 14.x rounded up.
  assert.ok(body.timeout_s >= 14 && body.timeout_s <= 15, JSON.stringify(body));
  assert.ok(sandbox.timeoutAt.getTime() > Date.now() + 13_000);
});

test("updateNetworkPolicy sends PATCH …/network with both lists", async () => {
  await sandbox.updateNetworkPolicy({ allow: ["api.example.org"], deny: ["10.0.0.0/8"] });
  const patch = fake.requests.find((r) => r.method === "PATCH");
  assert.equal(patch?.path, "/sandboxes/sb-1/network");
  assert.deepEqual(patch?.json, { allow: ["api.example.org"], deny: ["10.0.0.0/8"] });
  await sandbox.updateNetworkPolicy("allow-all");
  assert.deepEqual(fake.requests.filter((r) => r.method === "PATCH").at(-1)?.json, {});
  await assert.rejects(sandbox.updateNetworkPolicy("deny-all"), TypeError);
});

test("domain(port) is the exposed port's host; an unexposed port throws", () => {
  assert.equal(sandbox.domain(3000), "http://127.0.0.1:40000");
  assert.throws(() => sandbox.domain(8080), (e: unknown) => e instanceof EmberError && e.code === "port_not_exposed");
});

test("lifecycle options map to the create body (idleTimeout ms -> s rounded up)", async () => {
  assert.deepEqual(createBody({ onTimeout: "pause", autoResume: false, idleTimeout: 2001 }), {
    on_timeout: "pause",
    auto_resume: false,
    idle_timeout_s: 3,
  });
  assert.deepEqual(createBody({ onTimeout: "snapshot", idleTimeout: 3000 }), { on_timeout: "snapshot", idle_timeout_s: 3 });
  assert.deepEqual(createBody({ autoResume: true }), { auto_resume: true });
  assert.throws(() => createBody({ idleTimeout: 0 }), TypeError);
  const created = await Sandbox.create({ socket, onTimeout: "pause", idleTimeout: 5000, timeout: 60_000 });
  assert.deepEqual(fake.requests.at(-1)?.json, { timeout_s: 60, on_timeout: "pause", idle_timeout_s: 5 });
  assert.equal(created.suspended, null);
});

const suspendedInfo = {
  state: "paused",
  on_timeout: "pause",
  idle_timeout_s: 3,
  suspended: { reason: "idle", how: "pause", at_unix_ms: 1_700_000_000_000 },
};

test("suspended comes from the last info; refresh() reads it again", async () => {
  infoOverrides = suspendedInfo;
  const paused = await Sandbox.get("sb-1", { socket });
  assert.equal(paused.status, "paused");
  assert.deepEqual(paused.suspended, { reason: "idle", how: "pause", at_unix_ms: 1_700_000_000_000 });
  assert.equal(paused.info.on_timeout, "pause");
  assert.equal(paused.info.idle_timeout_s, 3);
  infoOverrides = {};
  await paused.refresh();
  assert.equal(paused.suspended, null);
  assert.equal(paused.status, "running");
});

test("the ember-resumed header of the exec answer is CommandFinished.resumed; the sandbox runs again", async () => {
  infoOverrides = suspendedInfo;
  const paused = await Sandbox.get("sb-1", { socket });
  infoOverrides = {};
  onExec = async (_req, res) => {
    res.setHeader("ember-resumed", "pause");
    await writeNdjson(res, [started, { type: "stdout", data: "ok\n" }, exit0]);
    res.end();
  };
  const result = await paused.runCommand("echo", ["ok"]);
  assert.equal(result.resumed, "pause");
  assert.equal(await result.stdout(), "ok\n");
  // The answer said it resumed the sandbox: it is running, no longer suspended.
  assert.equal(paused.status, "running");
  assert.equal(paused.suspended, null);
  onExec = async (_req, res) => {
    await writeNdjson(res, [started, exit0]);
    res.end();
  };
  const again = await paused.runCommand("true");
  assert.equal(again.resumed, null);
});

test("a detached command's resumed (snapshot) carries over to its wait(); getCommand reads the header too", async () => {
  onExec = async (_req, res) => FakeServer.json(res, 202, detachedInfo, { "ember-resumed": "snapshot" });
  onLogs = async (_req, res) => {
    await writeNdjson(res, [{ type: "stdout", data: "x" }, exit0]);
    res.end();
  };
  const command = await sandbox.runCommand({ cmd: "x", detached: true });
  assert.equal(command.resumed, "snapshot");
  const done = await command.wait();
  assert.equal(done.resumed, "snapshot");
  assert.equal(done.exitCode, 0);
  assert.equal((await sandbox.getCommand("c9")).resumed, null);
  commandsHeaders = { "ember-resumed": "pause" };
  assert.equal((await sandbox.getCommand("c9")).resumed, "pause");
});

test("resumedFrom reads pause and snapshot only", () => {
  assert.equal(resumedFrom({ "ember-resumed": "pause" }), "pause");
  assert.equal(resumedFrom({ "ember-resumed": "Snapshot " }), "snapshot");
  assert.equal(resumedFrom({ "ember-resumed": ["pause", "snapshot"] as unknown as string }), "pause");
  assert.equal(resumedFrom({ "ember-resumed": "stop" }), null);
  assert.equal(resumedFrom({}), null);
});

test("listCommands() is the sandbox's commands, typed", async () => {
  commandsHeaders = {};
  const commands: CommandInfo[] = await sandbox.listCommands();
  assert.equal(fake.requests.at(-1)?.method, "GET");
  assert.equal(fake.requests.at(-1)?.path, "/sandboxes/sb-1/commands");
  assert.deepEqual(
    commands.map((c) => [c.cmd_id, c.status, c.exit_code ?? null]),
    [
      ["c1", "finished", 0],
      ["c2", "running", null],
    ],
  );
});

test("metrics() is one typed SandboxMetrics sample; a missing sandbox is a NotFoundError", async () => {
  const metrics: SandboxMetrics = await sandbox.metrics();
  assert.equal(fake.requests.at(-1)?.path, "/sandboxes/sb-1/metrics");
  assert.equal(metrics.id, "sb-1");
  assert.equal(metrics.state, "running");
  assert.equal(metrics.guest?.cpus, 2);
  assert.equal(metrics.guest?.memory_used_bytes, 56 << 20);
  assert.equal(metrics.host.rss_bytes, 64 << 20);
  const gone = new Sandbox(sandbox.connection, { ...sandbox.info, id: "gone" });
  await assert.rejects(gone.metrics(), NotFoundError);
});

test("status, refresh, get, stop (twice is fine)", async () => {
  assert.equal(sandbox.status, "running");
  const again = await Sandbox.get({ sandboxId: "sb-1", socket });
  assert.equal(again.sandboxId, "sb-1");
  await assert.rejects(Sandbox.get("no-such-id", { socket }), NotFoundError);
  const gone = new Sandbox(sandbox.connection, { ...sandbox.info, id: "gone" });
  await gone.stop();
  await sandbox.stop();
  assert.equal(sandbox.status, "stopped");
});

test("bodies of answers are fully read so kept-alive connections are reused", async () => {
  const res = await sandbox.connection.request("getSandbox", { params: { id: "sb-1" } });
  const body = await readBody(res);
  assert.equal(JSON.parse(body.toString()).id, "sb-1");
});
