// NDJSON: one JSON document per line. Lines are split on the byte `\n`, so a chunk boundary
// anywhere (inside a line, inside a multi-byte UTF-8 character) is fine.

import type { OutputRecord } from "./generated/api.js";
import { ProtocolError } from "./errors.js";

/** Splits a byte stream into JSON records; feed it chunks, then call `end()`. */
export class NdjsonParser {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private line = 0;

  /** The records completed by `chunk`. */
  push(chunk: Buffer | Uint8Array | string): unknown[] {
    let data = typeof chunk === "string" ? Buffer.from(chunk, "utf8") : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    const records: unknown[] = [];
    let newline = data.indexOf(0x0a);
    while (newline !== -1) {
      const head = data.subarray(0, newline);
      const line = this.pendingBytes > 0 ? Buffer.concat([...this.pending, head]) : head;
      this.pending = [];
      this.pendingBytes = 0;
      const record = this.parse(line);
      if (record !== undefined) records.push(record);
      data = data.subarray(newline + 1);
      newline = data.indexOf(0x0a);
    }
    if (data.length > 0) {
      // Copied: the caller may reuse its buffer.
      this.pending.push(Buffer.from(data));
      this.pendingBytes += data.length;
    }
    return records;
  }

  /** The last record, when the stream did not end with a newline. */
  end(): unknown[] {
    if (this.pendingBytes === 0) return [];
    const line = Buffer.concat(this.pending);
    this.pending = [];
    this.pendingBytes = 0;
    const record = this.parse(line);
    return record === undefined ? [] : [record];
  }

  private parse(line: Buffer): unknown {
    this.line++;
    const text = line.toString("utf8").trim();
    if (text === "") return undefined;
    try {
      return JSON.parse(text);
    } catch (cause) {
      throw new ProtocolError(`NDJSON line ${this.line} is not JSON: ${text.slice(0, 200)}`, {
        code: "invalid_ndjson",
        cause,
      });
    }
  }
}

/** The records of an NDJSON byte stream, in order. */
export async function* parseNdjson(stream: AsyncIterable<Buffer | Uint8Array | string>): AsyncGenerator<unknown> {
  const parser = new NdjsonParser();
  for await (const chunk of stream) {
    yield* parser.push(chunk);
  }
  yield* parser.end();
}

/** The bytes of an output record: `data` (UTF-8 text) or `data_base64`. */
export function outputBytes(record: { data?: string | null; data_base64?: string | null }): Buffer {
  if (typeof record.data === "string") return Buffer.from(record.data, "utf8");
  if (typeof record.data_base64 === "string") return Buffer.from(record.data_base64, "base64");
  return Buffer.alloc(0);
}

const RECORD_TYPES = new Set(["started", "stdout", "stderr", "exit"]);

/** Checks that a parsed line is an output record (by its `type`). */
export function asOutputRecord(value: unknown): OutputRecord {
  if (value === null || typeof value !== "object") {
    throw new ProtocolError(`an output record must be a JSON object, not ${JSON.stringify(value)}`);
  }
  const type = (value as { type?: unknown }).type;
  if (typeof type !== "string" || !RECORD_TYPES.has(type)) {
    throw new ProtocolError(`unknown output record type ${JSON.stringify(type)}`);
  }
  return value as OutputRecord;
}
