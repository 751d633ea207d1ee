import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { tmpdir } from "node:os";
import { createServer, type AddressInfo } from "node:net";

import {
  AuthenticationError,
  BadRequestError,
  ConflictError,
  ConnectionError,
  EmberError,
  NotFoundError,
  RateLimitError,
  Sandbox,
  ServerError,
} from "../../index.js";
import { errorFromResponse, parseRetryAfter } from "../../errors.js";
import { FakeServer } from "./fake-server.js";

const doc = (code: string, message: string) => JSON.stringify({ error: { code, message } });

test("each status maps to its class, with code, status and message", () => {
  const cases: [number, string, new (...args: never[]) => EmberError][] = [
    [400, "invalid_json", BadRequestError],
    [400, "invalid_request", BadRequestError],
    [413, "too_large", BadRequestError],
    [422, "step_failed", BadRequestError],
    [401, "unauthorized", AuthenticationError],
    [404, "not_found", NotFoundError],
    [409, "conflict", ConflictError],
    [429, "too_many_sandboxes", RateLimitError],
    [500, "internal", ServerError],
    [502, "agent_unreachable", ServerError],
    [503, "agent_busy", ServerError],
  ];
  for (const [status, code, cls] of cases) {
    const error = errorFromResponse(status, doc(code, `message ${status}`));
    assert.ok(error instanceof cls, `${status} -> ${cls.name}, got ${error.constructor.name}`);
    assert.ok(error instanceof EmberError);
    assert.ok(error instanceof Error);
    assert.equal(error.code, code);
    assert.equal(error.status, status);
    assert.equal(error.message, `message ${status}`);
    assert.equal(error.name, cls.name);
  }
  const other = errorFromResponse(403, doc("permission_denied", "no"));
  assert.equal(other.constructor, EmberError);
  assert.equal(other.code, "permission_denied");
});

test("a body that is not an error document keeps its text and gets an http_ code", () => {
  const error = errorFromResponse(502, "<html>Bad Gateway</html>");
  assert.ok(error instanceof ServerError);
  assert.equal(error.code, "http_502");
  assert.match(error.message, /Bad Gateway/);
  const empty = errorFromResponse(500, "");
  assert.equal(empty.message, "HTTP 500");
});

test("Retry-After: seconds or an HTTP date", () => {
  assert.equal(parseRetryAfter("7"), 7);
  assert.equal(parseRetryAfter(["3"]), 3);
  assert.equal(parseRetryAfter(undefined), undefined);
  assert.equal(parseRetryAfter("soon"), undefined);
  const now = Date.parse("2025-01-01T00:00:00Z");
  assert.equal(parseRetryAfter("Wed, 01 Jan 2025 00:00:10 GMT", now), 10);
  const limited = errorFromResponse(429, doc("rate_limited", "slow down"), { "retry-after": "12" });
  assert.ok(limited instanceof RateLimitError);
  assert.equal(limited.retryAfter, 12);
});

let fake: FakeServer;
let socket: string;
before(async () => {
  fake = new FakeServer();
  socket = await fake.listenUnix();
  fake
    .on("GET", "/sandboxes/{id}", (_req, res, p) => {
      const id = p["id"] as string;
      if (id === "limited") FakeServer.error(res, 429, "rate_limited", "too many requests", { "retry-after": "5" });
      else if (id === "conflict") FakeServer.error(res, 409, "conflict", "sandbox x is stopped");
      else if (id === "boom") FakeServer.error(res, 500, "internal", "it broke");
      else FakeServer.error(res, 404, "not_found", `no sandbox "${id}"`);
    })
    .on("POST", "/sandboxes", (_req, res) => FakeServer.error(res, 400, "invalid_json", "unknown field `bogus`"));
});
after(() => fake.close());

test("errors from a (fake) service over a Unix socket", async () => {
  await assert.rejects(Sandbox.get("nope", { socket }), (e: unknown) => {
    assert.ok(e instanceof NotFoundError);
    assert.equal(e.status, 404);
    assert.equal(e.code, "not_found");
    assert.equal(e.message, 'no sandbox "nope"');
    return true;
  });
  await assert.rejects(Sandbox.get("limited", { socket }), (e: unknown) => e instanceof RateLimitError && e.retryAfter === 5);
  await assert.rejects(Sandbox.get("conflict", { socket }), ConflictError);
  await assert.rejects(Sandbox.get("boom", { socket }), ServerError);
  await assert.rejects(Sandbox.create({ socket }), BadRequestError);
});

test("no socket there: a ConnectionError with code connection_failed", async () => {
  const missing = join(tmpdir(), `ember-no-such-${process.pid}.sock`);
  await assert.rejects(Sandbox.get("x", { socket: missing }), (e: unknown) => {
    assert.ok(e instanceof ConnectionError, String(e));
    assert.equal(e.code, "connection_failed");
    assert.equal(e.status, undefined);
    assert.match(e.message, /ENOENT|no such file/i);
    return true;
  });
});

test("a refused TCP connection is a ConnectionError too", async () => {
  // A port that was just free: bound, then closed again.
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  await assert.rejects(Sandbox.get("x", { url: `http://127.0.0.1:${port}`, token: "t" }), (e: unknown) => {
    assert.ok(e instanceof ConnectionError, String(e));
    assert.match(e.message, /ECONNREFUSED/);
    return true;
  });
});
