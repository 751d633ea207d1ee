// Live tests against a real `ember serve` (run in the lab):
//
//   cd sdk/typescript && npm run build && \
//     EMBER_SOCKET=/run/ember.sock EMBER_URL=https://HOST:7443 EMBER_TOKEN=… EMBER_CA_FILE=ca.pem \
//     node --test --test-concurrency=1 dist/test/live/
//
// EMBER_SOCKET is required: without it every test fails (they never skip). The 401 test also
// needs EMBER_URL, EMBER_TOKEN and EMBER_CA_FILE (EMBER_LIVE_SKIP_REMOTE=1 skips it
// explicitly). The sandbox tests use the socket explicitly, so EMBER_URL does not take over.
// One sandbox is shared by most tests; every sandbox and snapshot made here is removed at the
// end. The guest is Debian with coreutils and sh (no bash or python3 assumed).

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { Readable, Writable } from "node:stream";

import {
  AuthenticationError,
  Command,
  CommandFinished,
  ConflictError,
  NotFoundError,
  Sandbox,
  Snapshot,
  health,
  type ConnectionOptions,
} from "../../index.js";

// Generous: the lab runs guests 20-30x slower than hardware, more when the host is busy.
const TIMEOUT = { timeout: 400_000 };
const SOCKET = process.env["EMBER_SOCKET"];

function socketOptions(): ConnectionOptions {
  if (!SOCKET) {
    throw new Error("EMBER_SOCKET is not set: the live tests need a running ember service (set EMBER_SOCKET=/path/to/ember.sock)");
  }
  return { socket: SOCKET };
}

const created: Sandbox[] = [];
const snapshots: Snapshot[] = [];
let sharedSandbox: Promise<Sandbox> | undefined;

/** The sandbox most tests share (created on first use). */
function shared(): Promise<Sandbox> {
  sharedSandbox ??= (async () => {
    const sandbox = await Sandbox.create({ ...socketOptions(), timeout: 900_000, ports: [8000] });
    created.push(sandbox);
    return sandbox;
  })();
  return sharedSandbox;
}

async function track(sandbox: Sandbox | Promise<Sandbox>): Promise<Sandbox> {
  const s = await sandbox;
  created.push(s);
  return s;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function sha256(data: Buffer | string): string {
  return createHash("sha256").update(data).digest("hex");
}

after(async () => {
  for (const sandbox of created) await sandbox.stop().catch(() => undefined);
  for (const snapshot of snapshots) await snapshot.delete().catch(() => undefined);
});

test("EMBER_SOCKET is set and the service answers", TIMEOUT, async () => {
  assert.ok(SOCKET, "EMBER_SOCKET is not set: the live tests need a running ember service");
  const h = await health(socketOptions());
  assert.equal(h.status, "ok");
});

test("a sandbox runs a command: 44 × 44", TIMEOUT, async () => {
  const sandbox = await shared();
  assert.equal(sandbox.status, "running");
  assert.match(sandbox.sandboxId, /\S/);
  const result = await sandbox.runCommand("sh", ["-c", "echo $((44 * 44))"]);
  assert.ok(result instanceof CommandFinished);
  assert.equal(result.exitCode, 0);
  assert.equal(await result.stdout(), "1936\n");
  assert.equal(await result.stderr(), "");
  const failing = await sandbox.runCommand("sh", ["-c", "echo oops >&2; exit 7"]);
  assert.equal(failing.exitCode, 7);
  assert.equal(await failing.stderr(), "oops\n");
});

test("the README's example: node -e 'console.log(44 * 44)' (when the runtime has node)", TIMEOUT, async (t) => {
  const sandbox = await shared();
  const which = await sandbox.runCommand("sh", ["-c", "command -v node"]);
  if (which.exitCode !== 0) {
    t.skip("this runtime has no node");
    return;
  }
  const result = await sandbox.runCommand("node", ["-e", "console.log(44 * 44)"]);
  assert.equal(await result.stdout(), "1936\n");
});

test("output streams in order, and arrives before the command ends", TIMEOUT, async () => {
  const sandbox = await shared();
  const arrivals: { text: string; at: number }[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      arrivals.push({ text: chunk.toString("utf8"), at: Date.now() });
      callback();
    },
  });
  const result = await sandbox.runCommand({
    cmd: "sh",
    args: ["-c", "for i in 1 2 3 4 5; do echo $i; sleep 0.2; done"],
    stdout: sink,
  });
  const end = Date.now();
  assert.equal(result.exitCode, 0);
  assert.equal(await result.stdout(), "1\n2\n3\n4\n5\n");
  assert.equal(arrivals.map((a) => a.text).join(""), "1\n2\n3\n4\n5\n");
  assert.ok(arrivals.length >= 3, `the output came in ${arrivals.length} piece(s), not as it was written`);
  const first = arrivals[0] as { at: number };
  assert.ok(end - first.at >= 500, `the first line arrived ${end - first.at} ms before the end (expected ~800)`);
});

test("logs() keeps stdout and stderr interleaved as written", TIMEOUT, async () => {
  const sandbox = await shared();
  const script = "echo o1; sleep 0.2; echo e1 >&2; sleep 0.2; echo o2; sleep 0.2; echo e2 >&2";
  const result = await sandbox.runCommand("sh", ["-c", script]);
  const seen: string[] = [];
  for await (const line of result.logs()) seen.push(`${line.stream}:${line.data}`);
  assert.deepEqual(seen, ["stdout:o1\n", "stderr:e1\n", "stdout:o2\n", "stderr:e2\n"]);
  assert.equal(await result.stdout(), "o1\no2\n");
  assert.equal(await result.stderr(), "e1\ne2\n");
});

test("non-UTF-8 output comes back byte for byte", TIMEOUT, async () => {
  const sandbox = await shared();
  const result = await sandbox.runCommand("sh", ["-c", "printf '\\377\\376abc'"]);
  assert.equal(result.exitCode, 0);
  assert.deepEqual(await result.stdoutBytes(), Buffer.from([0xff, 0xfe, 0x61, 0x62, 0x63]));
});

test("a 50 MB file written (streamed) and read back is the same (sha256)", TIMEOUT, async () => {
  const sandbox = await shared();
  const size = 50 * 1024 * 1024;
  const data = randomBytes(size);
  const expected = sha256(data);
  const path = "/var/tmp/ember-live-50mb.bin";
  const chunk = 1024 * 1024;
  await sandbox.writeFiles([
    {
      path,
      content: Readable.from(
        (function* () {
          for (let i = 0; i < size; i += chunk) yield data.subarray(i, i + chunk);
        })(),
      ),
    },
  ]);
  const inGuest = await sandbox.runCommand("sha256sum", [path]);
  assert.equal((await inGuest.stdout()).split(/\s+/)[0], expected, "sha256sum in the guest");
  const stream = await sandbox.readFile(path);
  assert.ok(stream, "the file is there");
  const hash = createHash("sha256");
  let bytes = 0;
  for await (const piece of stream) {
    hash.update(piece as Buffer);
    bytes += (piece as Buffer).length;
  }
  assert.equal(bytes, size);
  assert.equal(hash.digest("hex"), expected);
  await sandbox.runCommand("rm", ["-f", path]);
});

test("files: mkDir, writeFiles with a mode, readFile of a missing file is null", TIMEOUT, async () => {
  const sandbox = await shared();
  await sandbox.mkDir("/var/tmp/ember-live/a/b");
  await sandbox.writeFiles([
    { path: "/var/tmp/ember-live/a/b/run.sh", content: "#!/bin/sh\necho ran $1\n", mode: 0o755 },
    { path: "/var/tmp/ember-live/a/text.txt", content: Buffer.from("héllo") },
  ]);
  const ran = await sandbox.runCommand("/var/tmp/ember-live/a/b/run.sh", ["ok"]);
  assert.equal(await ran.stdout(), "ran ok\n");
  assert.equal((await sandbox.readFileToBuffer("/var/tmp/ember-live/a/text.txt"))?.toString("utf8"), "héllo");
  assert.equal(await sandbox.readFile("/var/tmp/ember-live/no-such-file"), null);
  await assert.rejects(sandbox.readFile("/var/tmp/ember-live/a"), ConflictError); // a directory
  await assert.rejects(sandbox.readFile("relative/path"), (e: unknown) => (e as { status?: number }).status === 400);
});

test("a command killed through an AbortSignal ends with signal 9 within seconds", TIMEOUT, async () => {
  const sandbox = await shared();
  const controller = new AbortController();
  const start = Date.now();
  setTimeout(() => controller.abort(), 1000);
  const result = await sandbox.runCommand("sleep", ["60"], { signal: controller.signal });
  const took = Date.now() - start;
  assert.equal(result.signal, 9);
  assert.equal(result.exitCode, null);
  assert.ok(took < 15_000, `took ${took} ms`);
});

test("32 concurrent runCommands on one sandbox each return their own output", TIMEOUT, async () => {
  const sandbox = await shared();
  const results = await Promise.all(
    Array.from({ length: 32 }, (_, i) =>
      sandbox.runCommand("sh", ["-c", `echo start-${i}; sleep 0.5; echo end-${i} >&2; exit ${i % 5}`]),
    ),
  );
  for (const [i, result] of results.entries()) {
    assert.equal(await result.stdout(), `start-${i}\n`, `command ${i}`);
    assert.equal(await result.stderr(), `end-${i}\n`, `command ${i}`);
    assert.equal(result.exitCode, i % 5, `command ${i}`);
  }
  assert.equal(new Set(results.map((r) => r.cmdId)).size, 32);
});

test("a detached command: logs() follows it, wait() ends it, kill() stops another", TIMEOUT, async () => {
  const sandbox = await shared();
  const command = await sandbox.runCommand({
    cmd: "sh",
    args: ["-c", "for i in 1 2 3; do echo tick $i; sleep 0.3; done; echo bye >&2; exit 3"],
    detached: true,
  });
  assert.ok(command instanceof Command);
  assert.ok(!(command instanceof CommandFinished));
  assert.match(command.cmdId, /\S/);
  const started = Date.now();
  const lines: { stream: string; data: string; at: number }[] = [];
  for await (const line of command.logs()) lines.push({ stream: line.stream, data: line.data, at: Date.now() });
  const stdout = lines.filter((l) => l.stream === "stdout").map((l) => l.data).join("");
  const stderr = lines.filter((l) => l.stream === "stderr").map((l) => l.data).join("");
  assert.equal(stdout, "tick 1\ntick 2\ntick 3\n");
  assert.equal(stderr, "bye\n");
  assert.ok((lines[0] as { at: number }).at - started < 600, "the first line came while it ran");
  const finished = await command.wait();
  assert.ok(finished instanceof CommandFinished);
  assert.equal(finished.exitCode, 3);
  assert.equal(await finished.stdout(), "tick 1\ntick 2\ntick 3\n");
  assert.equal(await finished.stderr(), "bye\n");

  const sleeper = await sandbox.runCommand({ cmd: "sleep", args: ["60"], detached: true });
  await sleep(300);
  const waiting = sleeper.wait();
  await sleeper.kill(); // SIGTERM
  const killed = await waiting;
  assert.equal(killed.signal, 15);
  assert.equal(killed.exitCode, null);
  await assert.rejects(sleeper.kill(), ConflictError); // it has finished
  const again = await sandbox.getCommand(sleeper.cmdId);
  assert.equal((await again.info()).status, "finished");
});

test("extendTimeout moves the deadline; domain(port) is where an exposed port is", TIMEOUT, async () => {
  const sandbox = await shared();
  const before = (await sandbox.refresh()).timeout_at_unix_ms;
  await sandbox.extendTimeout(60_000);
  const afterExtend = sandbox.info.timeout_at_unix_ms;
  assert.ok(Math.abs(afterExtend - (before + 60_000)) < 3000, `deadline ${before} -> ${afterExtend}`);
  assert.match(sandbox.domain(8000), /^http:\/\/127\.0\.0\.1:\d+$/);
  assert.throws(() => sandbox.domain(8001), /not exposed/);
});

test("404: Sandbox.get of an unknown id is a NotFoundError", TIMEOUT, async () => {
  await assert.rejects(Sandbox.get("no-such-id", socketOptions()), (e: unknown) => {
    assert.ok(e instanceof NotFoundError, String(e));
    assert.equal(e.status, 404);
    assert.equal(e.code, "not_found");
    return true;
  });
});

test("401: the remote URL with a wrong token is an AuthenticationError", TIMEOUT, async (t) => {
  const url = process.env["EMBER_URL"];
  const token = process.env["EMBER_TOKEN"];
  const ca = process.env["EMBER_CA_FILE"];
  if (process.env["EMBER_LIVE_SKIP_REMOTE"] === "1") {
    t.skip("EMBER_LIVE_SKIP_REMOTE=1");
    return;
  }
  assert.ok(url && token && ca, "the 401 test needs EMBER_URL, EMBER_TOKEN and EMBER_CA_FILE (or EMBER_LIVE_SKIP_REMOTE=1)");
  socketOptions(); // EMBER_SOCKET is required for the whole suite
  await assert.rejects(Sandbox.get("no-such-id", { url, token: `wrong-${Date.now()}`, ca }), (e: unknown) => {
    assert.ok(e instanceof AuthenticationError, String(e));
    assert.equal(e.status, 401);
    assert.equal(e.code, "unauthorized");
    return true;
  });
  // The right token gets through (and a 404 is still a 404).
  assert.equal((await health({ url, token, ca })).status, "ok");
  await assert.rejects(Sandbox.get("no-such-id", { url, token, ca }), NotFoundError);
});

test("a snapshot restores with a file written before it; fork(1) too", TIMEOUT, async () => {
  const sandbox = await shared();
  const marker = `marker-${randomBytes(8).toString("hex")}\n`;
  const path = "/var/tmp/ember-live-marker";
  await sandbox.writeFiles([{ path, content: marker }]);
  const snapshot = await sandbox.snapshot();
  snapshots.push(snapshot);
  assert.match(snapshot.snapshotId, /\S/);
  assert.equal(sandbox.status, "running", "the sandbox keeps running after a snapshot");
  const restored = await track(
    Sandbox.create({ ...socketOptions(), source: { type: "snapshot", snapshotId: snapshot.snapshotId }, timeout: 120_000 }),
  );
  assert.notEqual(restored.sandboxId, sandbox.sandboxId);
  assert.equal(restored.status, "running");
  assert.equal((await restored.readFileToBuffer(path))?.toString("utf8"), marker);
  const cat = await restored.runCommand("cat", [path]);
  assert.equal(await cat.stdout(), marker);
  await restored.stop();

  const clones = await sandbox.fork(1, { timeout: 120_000 });
  created.push(...clones);
  assert.equal(clones.length, 1);
  const clone = clones[0] as Sandbox;
  // fork() snapshots the sandbox first; the clone names that snapshot (removed at the end).
  assert.ok(clone.info.snapshot, "a clone names the snapshot it was restored from");
  snapshots.push(await Snapshot.get({ ...socketOptions(), snapshotId: clone.info.snapshot }));
  assert.equal((await clone.readFileToBuffer(path))?.toString("utf8"), marker);
  await clone.stop();
  // The original still works.
  assert.equal(await (await sandbox.runCommand("cat", [path])).stdout(), marker);
});

test("a sandbox stops at its timeout; commands on it are then refused", TIMEOUT, async () => {
  const sandbox = await track(Sandbox.create({ ...socketOptions(), timeout: 4000 }));
  await sleep(8000);
  let status: string;
  try {
    status = (await sandbox.refresh()).state;
  } catch (error) {
    assert.ok(error instanceof NotFoundError, String(error));
    status = "gone";
  }
  assert.ok(status === "stopped" || status === "gone", `status ${status}`);
  await assert.rejects(sandbox.runCommand("true"), (e: unknown) => e instanceof ConflictError || e instanceof NotFoundError);
});

test("an idle sandbox with onTimeout pause is paused; the next command resumes it (resumed: pause)", TIMEOUT, async () => {
  const sandbox = await track(Sandbox.create({ ...socketOptions(), timeout: 300_000, idleTimeout: 3000, onTimeout: "pause" }));
  assert.equal(sandbox.info.on_timeout, "pause");
  assert.equal(sandbox.info.auto_resume, true);
  assert.equal(sandbox.info.idle_timeout_s, 3);
  assert.equal(sandbox.info.suspended ?? null, null);
  // GET /sandboxes/{id} is not a use: polling does not keep it awake.
  const deadline = Date.now() + 90_000;
  let info = await sandbox.refresh();
  while (!(info.state === "paused" && info.suspended?.reason === "idle") && Date.now() < deadline) {
    await sleep(500);
    info = await sandbox.refresh();
  }
  assert.equal(info.state, "paused", `not paused 30 s in: ${JSON.stringify(info)}`);
  const suspension = sandbox.suspended;
  assert.equal(suspension?.reason, "idle");
  assert.equal(suspension?.how, "pause");
  const result = await sandbox.runCommand("echo", ["ok"]);
  assert.equal(result.resumed, "pause");
  assert.equal(result.exitCode, 0);
  assert.equal(await result.stdout(), "ok\n");
  // The same sandbox (same id) runs again.
  const after = await sandbox.refresh();
  assert.equal(after.id, info.id);
  assert.equal(after.state, "running");
  assert.equal(after.suspended ?? null, null);
});

test("metrics() of a running sandbox: the guest's CPUs and the VMM's RSS", TIMEOUT, async () => {
  const sandbox = await shared();
  const metrics = await sandbox.metrics();
  assert.equal(metrics.id, sandbox.sandboxId);
  assert.equal(metrics.state, "running");
  assert.ok(metrics.guest, `no guest metrics: ${metrics.guest_error ?? "(no guest_error)"}`);
  assert.ok(metrics.guest.cpus >= 1, `guest.cpus ${metrics.guest.cpus}`);
  assert.ok((metrics.host.rss_bytes ?? 0) > 0, `host.rss_bytes ${metrics.host.rss_bytes}`);
});
