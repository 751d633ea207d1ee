import { test } from "node:test";
import assert from "node:assert/strict";
import { Readable } from "node:stream";

import { NdjsonParser, outputBytes, parseNdjson } from "../../ndjson.js";
import { ProtocolError } from "../../errors.js";

const records = [
  { type: "started", cmd_id: "c1", pid: 42 },
  { type: "stdout", data: "héllo wörld € 🎉\n" },
  { type: "stderr", data_base64: Buffer.from([0xff, 0xfe, 0x61]).toString("base64") },
  { type: "stdout", data: "line with \\n escaped and a \"quote\"" },
  { type: "exit", exit_code: 0, signal: null, timed_out: false, duration_ms: 12.5 },
];
const wire = Buffer.from(records.map((r) => JSON.stringify(r) + "\n").join(""), "utf8");

test("records come out whole wherever the chunks are cut (every split point, incl. inside UTF-8)", () => {
  for (let cut = 0; cut <= wire.length; cut++) {
    const parser = new NdjsonParser();
    const out = [...parser.push(wire.subarray(0, cut)), ...parser.push(wire.subarray(cut)), ...parser.end()];
    assert.deepEqual(out, records, `cut at ${cut}`);
  }
});

test("one byte at a time", () => {
  const parser = new NdjsonParser();
  const out: unknown[] = [];
  for (const byte of wire) out.push(...parser.push(Buffer.from([byte])));
  out.push(...parser.end());
  assert.deepEqual(out, records);
});

test("a last line without a newline, blank lines and CRLF", () => {
  const parser = new NdjsonParser();
  const out = [...parser.push('{"a":1}\r\n\n  \n{"b":2}'), ...parser.end()];
  assert.deepEqual(out, [{ a: 1 }, { b: 2 }]);
});

test("the parser does not keep a reference to the caller's buffer", () => {
  const parser = new NdjsonParser();
  const chunk = Buffer.from('{"a":');
  parser.push(chunk);
  chunk.fill(0x20);
  assert.deepEqual(parser.push("1}\n"), [{ a: 1 }]);
});

test("a line that is not JSON is a ProtocolError", () => {
  const parser = new NdjsonParser();
  assert.throws(() => parser.push("{not json}\n"), (e: unknown) => e instanceof ProtocolError && e.code === "invalid_ndjson");
});

test("parseNdjson over a stream of random-sized chunks", async () => {
  const chunks: Buffer[] = [];
  let seed = 7;
  for (let i = 0; i < wire.length; ) {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    const size = 1 + (seed % 9);
    chunks.push(wire.subarray(i, i + size));
    i += size;
  }
  const out: unknown[] = [];
  for await (const record of parseNdjson(Readable.from(chunks))) out.push(record);
  assert.deepEqual(out, records);
});

test("output records decode to exact bytes: text as UTF-8, base64 as given", () => {
  assert.deepEqual(outputBytes({ data: "é" }), Buffer.from([0xc3, 0xa9]));
  assert.deepEqual(outputBytes({ data_base64: "//5hYmM=" }), Buffer.from([0xff, 0xfe, 0x61, 0x62, 0x63]));
  assert.deepEqual(outputBytes({ data: null, data_base64: null }), Buffer.alloc(0));
});
