// How the SDK reaches the service: a Unix socket (plain HTTP/1.1), or an HTTPS URL with a
// bearer token and, optionally, a CA to trust a self-signed certificate. Every request goes
// through `Connection.request` with an operation from the table in operations.ts.

import { readFileSync } from "node:fs";
import * as http from "node:http";
import * as https from "node:https";
import { Readable } from "node:stream";

import { ConnectionError, EmberError, errorFromResponse } from "./errors.js";
import { buildPath, OPERATIONS, type OperationName } from "./operations.js";

/** Where the service is. Explicit options win over the environment. */
export interface ConnectionOptions {
  /** The service's Unix socket (default: `EMBER_SOCKET`). */
  socket?: string;
  /** The service's URL, `https://HOST:PORT` (default: `EMBER_URL`). */
  url?: string;
  /** The bearer token for `url` (default: `EMBER_TOKEN`). */
  token?: string;
  /** A CA certificate to trust for `url`: PEM text or a file path (default: `EMBER_CA_FILE`). */
  ca?: string | Buffer;
}

/** A resolved target: a socket, or a URL with its token and CA. */
export type ResolvedConnection =
  | { kind: "socket"; socket: string }
  | { kind: "url"; url: URL; token: string | undefined; ca: Buffer | undefined };

type Env = Record<string, string | undefined>;

function nonEmpty(value: string | undefined): string | undefined {
  return value === undefined || value === "" ? undefined : value;
}

/** PEM text, or the contents of the file it names. */
export function loadCa(ca: string | Buffer): Buffer {
  if (Buffer.isBuffer(ca)) return ca;
  if (ca.includes("-----BEGIN")) return Buffer.from(ca, "utf8");
  try {
    return readFileSync(ca);
  } catch (cause) {
    throw new ConnectionError(`cannot read the CA certificate ${ca}: ${(cause as Error).message}`, {
      code: "invalid_ca",
      cause,
    });
  }
}

/**
 * Which service to use. Precedence: explicit options (`url`, else `socket`) > `EMBER_URL`
 * (with `EMBER_TOKEN`) > `EMBER_SOCKET` > an error. A token or CA given as an option applies to
 * a URL from the environment too.
 */
export function resolveConnection(options: ConnectionOptions = {}, env: Env = process.env): ResolvedConnection {
  const fromUrl = (url: string): ResolvedConnection => {
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch (cause) {
      throw new ConnectionError(`invalid ember URL ${JSON.stringify(url)}`, { code: "invalid_url", cause });
    }
    if (parsed.protocol !== "https:" && parsed.protocol !== "http:") {
      throw new ConnectionError(`ember URL ${url}: use https:// (or http://)`, { code: "invalid_url" });
    }
    const ca = options.ca ?? nonEmpty(env["EMBER_CA_FILE"]);
    return {
      kind: "url",
      url: parsed,
      token: nonEmpty(options.token) ?? nonEmpty(env["EMBER_TOKEN"]),
      ca: ca === undefined ? undefined : loadCa(ca),
    };
  };
  const url = nonEmpty(options.url);
  if (url !== undefined) return fromUrl(url);
  const socket = nonEmpty(options.socket);
  if (socket !== undefined) return { kind: "socket", socket };
  const envUrl = nonEmpty(env["EMBER_URL"]);
  if (envUrl !== undefined) return fromUrl(envUrl);
  const envSocket = nonEmpty(env["EMBER_SOCKET"]);
  if (envSocket !== undefined) return { kind: "socket", socket: envSocket };
  throw new ConnectionError(
    "no ember service configured: set EMBER_SOCKET (a Unix socket) or EMBER_URL and EMBER_TOKEN, " +
      "or pass { socket } or { url, token }",
    { code: "not_configured" },
  );
}

/** What a request carries besides its operation. */
export interface RequestOptions {
  /** Values for the path's `{placeholders}`. */
  params?: Record<string, string>;
  /** Query parameters (undefined ones are left out). */
  query?: Record<string, string | undefined>;
  /** A JSON body (serialised), or raw bytes / a stream for a raw-body operation. */
  json?: unknown;
  body?: Buffer | Uint8Array | string | Readable;
  signal?: AbortSignal | undefined;
}

/** A request's response whose status was 2xx: the body is still to be read. */
export type Response = http.IncomingMessage & { statusCode: number };

/**
 * The error to throw for a failure while reading an answer's body: SDK errors and aborts as
 * they are, anything else (the connection reset mid-body) as a ConnectionError.
 */
export function bodyError(error: unknown, what: string): Error {
  if (error instanceof EmberError) return error;
  if (error instanceof Error && error.name === "AbortError") return error;
  const message = error instanceof Error ? error.message : String(error);
  return new ConnectionError(`${what}: the connection broke: ${message}`, { cause: error });
}

/** Reads a whole body. */
export async function readBody(stream: AsyncIterable<Buffer | string>): Promise<Buffer> {
  const chunks: Buffer[] = [];
  try {
    for await (const chunk of stream) chunks.push(typeof chunk === "string" ? Buffer.from(chunk) : chunk);
  } catch (error) {
    throw bodyError(error, "reading an answer");
  }
  return Buffer.concat(chunks);
}

/** One service: its agent (kept-alive connections) and how to address it. */
export class Connection {
  readonly target: ResolvedConnection;
  private readonly agent: http.Agent;

  constructor(options: ConnectionOptions = {}, env: Env = process.env) {
    this.target = resolveConnection(options, env);
    if (this.target.kind === "url" && this.target.url.protocol === "https:") {
      this.agent = new https.Agent({ keepAlive: true, ...(this.target.ca ? { ca: this.target.ca } : {}) });
    } else {
      this.agent = new http.Agent({ keepAlive: true });
    }
  }

  /** Where requests go, for messages. */
  describe(): string {
    return this.target.kind === "socket" ? `unix:${this.target.socket}` : this.target.url.origin;
  }

  /** Closes idle kept-alive connections. */
  close(): void {
    this.agent.destroy();
  }

  /**
   * Sends one request; resolves with the response once its status is 2xx (the body unread),
   * or rejects with the typed error of a non-2xx answer or a ConnectionError.
   */
  request(name: OperationName, options: RequestOptions = {}): Promise<Response> {
    const op = OPERATIONS[name];
    let path = buildPath(op, options.params);
    if (options.query) {
      const search = new URLSearchParams();
      for (const [k, v] of Object.entries(options.query)) if (v !== undefined) search.append(k, v);
      const text = search.toString();
      if (text) path += `?${text}`;
    }
    const headers: http.OutgoingHttpHeaders = { accept: "application/json, application/x-ndjson" };
    let payload: Buffer | Readable | undefined;
    if (options.json !== undefined) {
      payload = Buffer.from(JSON.stringify(options.json), "utf8");
      headers["content-type"] = "application/json";
    } else if (options.body !== undefined) {
      headers["content-type"] = "application/octet-stream";
      payload =
        options.body instanceof Readable
          ? options.body
          : typeof options.body === "string"
            ? Buffer.from(options.body, "utf8")
            : Buffer.from(options.body.buffer, options.body.byteOffset, options.body.byteLength);
    }
    if (Buffer.isBuffer(payload)) headers["content-length"] = payload.length;
    const requestOptions: http.RequestOptions = { method: op.method, headers, agent: this.agent };
    const target = this.target;
    if (target.kind === "socket") {
      requestOptions.socketPath = target.socket;
      requestOptions.path = path;
      requestOptions.host = "localhost";
    } else {
      const base = target.url.pathname.replace(/\/+$/, "");
      requestOptions.protocol = target.url.protocol;
      requestOptions.hostname = target.url.hostname.replace(/^\[|\]$/g, "");
      requestOptions.port = target.url.port || (target.url.protocol === "https:" ? 443 : 80);
      requestOptions.path = base + path;
      if (target.token !== undefined) headers["authorization"] = `Bearer ${target.token}`;
    }
    const signal = options.signal;
    const what = `${op.method} ${path}`;
    return new Promise<Response>((resolve, reject) => {
      if (signal?.aborted) {
        reject(abortError(signal));
        return;
      }
      const transport = target.kind === "url" && target.url.protocol === "https:" ? https : http;
      const req = transport.request(requestOptions);
      let settled = false;
      const fail = (error: Error) => {
        if (settled) return;
        settled = true;
        signal?.removeEventListener("abort", onAbort);
        reject(error);
      };
      const onAbort = () => {
        req.destroy();
        fail(abortError(signal as AbortSignal));
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      req.on("error", (error: NodeJS.ErrnoException) => {
        if (error instanceof EmberError) return fail(error);
        fail(
          new ConnectionError(`${what} to ${this.describe()}: ${error.message}`, {
            cause: error,
          }),
        );
      });
      req.on("response", (res) => {
        const status = res.statusCode ?? 0;
        if (status >= 200 && status < 300) {
          if (settled) {
            res.destroy();
            return;
          }
          settled = true;
          // The caller reads the body; an abort now breaks it.
          signal?.removeEventListener("abort", onAbort);
          if (signal) {
            const breakBody = () => {
              // A body nobody reads yet must not turn the abort into an uncaught 'error'.
              if (res.listenerCount("error") === 0) res.once("error", () => undefined);
              res.destroy(abortError(signal));
            };
            signal.addEventListener("abort", breakBody, { once: true });
            res.once("close", () => signal.removeEventListener("abort", breakBody));
          }
          resolve(res as Response);
          return;
        }
        readBody(res).then(
          (body) => fail(errorFromResponse(status, body.toString("utf8"), res.headers)),
          (error: Error) =>
            fail(new ConnectionError(`${what}: reading the ${status} answer: ${error.message}`, { cause: error })),
        );
      });
      if (payload instanceof Readable) {
        payload.on("error", (error) => {
          req.destroy();
          fail(new EmberError(`${what}: reading the upload: ${error.message}`, { code: "upload_failed", cause: error }));
        });
        payload.pipe(req);
      } else {
        req.end(payload);
      }
    });
  }

  /** Sends a request and parses its JSON answer (undefined for an empty body, as a 204's). */
  async json<T>(name: OperationName, options: RequestOptions = {}): Promise<T> {
    return (await this.jsonWithHeaders<T>(name, options)).body;
  }

  /** Like `json`, with the answer's headers too (`ember-resumed`, ...). */
  async jsonWithHeaders<T>(
    name: OperationName,
    options: RequestOptions = {},
  ): Promise<{ body: T; headers: http.IncomingHttpHeaders }> {
    const res = await this.request(name, options);
    const body = await readBody(res);
    if (body.length === 0) return { body: undefined as T, headers: res.headers };
    try {
      return { body: JSON.parse(body.toString("utf8")) as T, headers: res.headers };
    } catch (cause) {
      throw new EmberError(`${OPERATIONS[name].method} ${OPERATIONS[name].path}: the answer is not JSON`, {
        code: "protocol_error",
        status: res.statusCode,
        cause,
      });
    }
  }
}

/** The error an aborted request rejects with: the signal's reason, else an AbortError. */
export function abortError(signal: AbortSignal): Error {
  const reason: unknown = signal.reason;
  if (reason instanceof Error) return reason;
  const error = new Error("The operation was aborted");
  error.name = "AbortError";
  return error;
}

const shared = new Map<string, Connection>();

/**
 * The connection for `options`: one per distinct target, so kept-alive sockets are shared by
 * every sandbox object of a service.
 */
export function connectionFor(options: ConnectionOptions = {}): Connection {
  const target = resolveConnection(options);
  const key =
    target.kind === "socket"
      ? `socket:${target.socket}`
      : `url:${target.url.href}|${target.token ?? ""}|${target.ca?.toString("base64") ?? ""}`;
  let connection = shared.get(key);
  if (connection === undefined) {
    connection = new Connection(options);
    shared.set(key, connection);
  }
  return connection;
}
