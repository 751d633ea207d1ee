// Commands in a sandbox: a running (detached) Command, and a CommandFinished once it ended.

import { once } from "node:events";
import type { IncomingHttpHeaders } from "node:http";
import type { Writable } from "node:stream";

import { abortError, bodyError, readBody, type Connection, type Response } from "./connection.js";
import { ConflictError, EmberError, NotFoundError, ProtocolError } from "./errors.js";
import type { CommandInfo, ExecBody, KillBody, OutputRecord } from "./generated/api.js";
import { asOutputRecord, outputBytes, parseNdjson } from "./ndjson.js";

export type StreamName = "stdout" | "stderr";

/** One piece of a command's output, in the order the command wrote it. */
export interface LogLine {
  stream: StreamName;
  /** The bytes decoded as UTF-8 (invalid sequences become U+FFFD; see `bytes`). */
  data: string;
  /** The exact bytes. */
  bytes: Buffer;
}

/**
 * How the sandbox had been suspended by its `onTimeout` when a request resumed it (the
 * `ember-resumed` response header): `"pause"` or `"snapshot"`.
 */
export type ResumedHow = "pause" | "snapshot";

/** The response header that says a request resumed its sandbox first. */
export const RESUMED_HEADER = "ember-resumed";

/** How a response's request resumed its sandbox, from `ember-resumed`; null when it did not. */
export function resumedFrom(headers: IncomingHttpHeaders): ResumedHow | null {
  const raw = headers[RESUMED_HEADER];
  const value = (Array.isArray(raw) ? raw[0] : raw)?.trim().toLowerCase();
  return value === "pause" || value === "snapshot" ? value : null;
}

/** A signal by number or name (`"SIGTERM"`, `"TERM"`); names use the guest's (Linux) numbers. */
export type Signal = number | string;

// Linux's numbers, whatever the client's platform says (macOS differs for some).
const LINUX_SIGNALS: Record<string, number> = {
  SIGHUP: 1,
  SIGINT: 2,
  SIGQUIT: 3,
  SIGILL: 4,
  SIGTRAP: 5,
  SIGABRT: 6,
  SIGBUS: 7,
  SIGFPE: 8,
  SIGKILL: 9,
  SIGUSR1: 10,
  SIGSEGV: 11,
  SIGUSR2: 12,
  SIGPIPE: 13,
  SIGALRM: 14,
  SIGTERM: 15,
  SIGCHLD: 17,
  SIGCONT: 18,
  SIGSTOP: 19,
  SIGTSTP: 20,
  SIGTTIN: 21,
  SIGTTOU: 22,
  SIGURG: 23,
  SIGXCPU: 24,
  SIGXFSZ: 25,
  SIGVTALRM: 26,
  SIGPROF: 27,
  SIGWINCH: 28,
  SIGIO: 29,
  SIGPWR: 30,
  SIGSYS: 31,
};

/** The Linux number of a signal given by number or name. */
export function signalNumber(signal: Signal): number {
  if (typeof signal === "number") {
    if (!Number.isInteger(signal) || signal < 1 || signal > 64) throw new TypeError(`invalid signal ${signal}`);
    return signal;
  }
  const name = signal.toUpperCase();
  const number = LINUX_SIGNALS[name.startsWith("SIG") ? name : `SIG${name}`];
  if (number === undefined) throw new TypeError(`unknown signal ${JSON.stringify(signal)}`);
  return number;
}

/** A command's output as it arrived: chunks in order, per stream. */
export class OutputLog {
  readonly chunks: { stream: StreamName; bytes: Buffer }[] = [];

  push(stream: StreamName, bytes: Buffer): void {
    if (bytes.length > 0) this.chunks.push({ stream, bytes });
  }

  bytes(stream: StreamName | "both"): Buffer {
    return Buffer.concat(this.chunks.filter((c) => stream === "both" || c.stream === stream).map((c) => c.bytes));
  }

  lines(): LogLine[] {
    return this.chunks.map((c) => ({ stream: c.stream, data: c.bytes.toString("utf8"), bytes: c.bytes }));
  }
}

/** How a command ended, as its `exit` record or its CommandInfo says. */
export interface CommandExitInfo {
  exitCode: number | null;
  signal: number | null;
  timedOut: boolean;
  error: string | null;
  durationMs: number | null;
}

interface CommandInit {
  connection: Connection;
  sandboxId: string;
  cmdId: string;
  pid?: number | null | undefined;
  argv?: string[] | undefined;
  startedAt?: number | undefined;
  resumed?: ResumedHow | null | undefined;
}

/** Writes to a sink, waiting for it to drain when it asks to. */
async function writeTo(sink: Writable | undefined, bytes: Buffer): Promise<void> {
  if (sink === undefined || bytes.length === 0 || sink.destroyed || sink.writableEnded) return;
  if (!sink.write(bytes)) {
    await Promise.race([once(sink, "drain"), once(sink, "close"), once(sink, "error")]).catch(() => undefined);
  }
}

/**
 * A command started in a sandbox. A detached `runCommand` resolves to one right after the
 * command starts; `wait()` resolves to its CommandFinished.
 */
export class Command {
  readonly sandboxId: string;
  /** The command's id in its sandbox. */
  readonly cmdId: string;
  /** Its process id in the guest, when known. */
  readonly pid: number | null;
  /** Its argv, when known. */
  readonly argv: string[] | undefined;
  /** When it started (ms since the epoch), when known. */
  readonly startedAt: number | undefined;
  /**
   * Whether the request that started (or fetched) it resumed its sandbox first, and how the
   * sandbox had been suspended by its `onTimeout` (`"pause"` or `"snapshot"`); null when the
   * sandbox was running already. From the `ember-resumed` response header.
   */
  readonly resumed: ResumedHow | null;
  protected readonly connection: Connection;

  constructor(init: CommandInit) {
    this.connection = init.connection;
    this.sandboxId = init.sandboxId;
    this.cmdId = init.cmdId;
    this.pid = init.pid ?? null;
    this.argv = init.argv;
    this.startedAt = init.startedAt;
    this.resumed = init.resumed ?? null;
  }

  /** The exit code: null while it runs (and, on a CommandFinished, when a signal ended it). */
  get exitCode(): number | null {
    return null;
  }

  private get params(): Record<string, string> {
    return { id: this.sandboxId, cid: this.cmdId };
  }

  /** The command as the service shows it now (status, exit, the newest output kept). */
  async info(options: { signal?: AbortSignal } = {}): Promise<CommandInfo> {
    return this.connection.json<CommandInfo>("getCommand", { params: this.params, signal: options.signal });
  }

  /**
   * Its output from the start, in order (stdout and stderr interleaved as written), following
   * it while it runs; ends when the command does.
   */
  async *logs(options: { signal?: AbortSignal } = {}): AsyncGenerator<LogLine> {
    for await (const item of this.follow(options.signal)) {
      if (item.kind === "output") {
        yield { stream: item.stream, data: item.bytes.toString("utf8"), bytes: item.bytes };
      }
    }
  }

  /** Waits for the command to end; its output is what the service kept of it. */
  async wait(options: { signal?: AbortSignal } = {}): Promise<CommandFinished> {
    const output = new OutputLog();
    for await (const item of this.follow(options.signal)) {
      if (item.kind === "output") output.push(item.stream, item.bytes);
      else return this.finished(item.exit, output);
    }
    throw new ProtocolError(`command ${this.cmdId}: its log ended before its exit`, { code: "incomplete_stream" });
  }

  /** Sends a signal (default SIGTERM) to the command's process group. */
  async kill(signal: Signal = "SIGTERM", options: { signal?: AbortSignal } = {}): Promise<void> {
    const body: KillBody = { signal: signalNumber(signal) };
    await this.connection.json("killCommand", { params: this.params, json: body, signal: options.signal });
  }

  /** Its stdout so far (UTF-8). */
  async stdout(): Promise<string> {
    return (await this.stdoutBytes()).toString("utf8");
  }

  /** Its stderr so far (UTF-8). */
  async stderr(): Promise<string> {
    return (await this.stderrBytes()).toString("utf8");
  }

  /** Its stdout so far, exact bytes (the newest 4 MiB the service keeps). */
  async stdoutBytes(): Promise<Buffer> {
    const info = await this.info();
    return infoOutput(info, "stdout");
  }

  /** Its stderr so far, exact bytes. */
  async stderrBytes(): Promise<Buffer> {
    const info = await this.info();
    return infoOutput(info, "stderr");
  }

  protected finished(exit: CommandExitInfo, output: OutputLog): CommandFinished {
    return new CommandFinished({
      connection: this.connection,
      sandboxId: this.sandboxId,
      cmdId: this.cmdId,
      pid: this.pid,
      argv: this.argv,
      startedAt: this.startedAt,
      resumed: this.resumed,
      exit,
      output,
    });
  }

  /**
   * The command's output then its exit: from `GET …/commands/{cid}/logs`, or, from a service
   * without that endpoint, by polling `GET …/commands/{cid}` (stdout and stderr then arrive
   * per poll rather than interleaved exactly).
   */
  private async *follow(
    signal: AbortSignal | undefined,
  ): AsyncGenerator<{ kind: "output"; stream: StreamName; bytes: Buffer } | { kind: "exit"; exit: CommandExitInfo }> {
    let res: Response;
    try {
      res = await this.connection.request("commandLogs", { params: this.params, signal });
    } catch (error) {
      if (isMissingEndpoint(error)) {
        yield* this.poll(signal);
        return;
      }
      throw error;
    }
    try {
      const records = parseNdjson(res);
      for (;;) {
        let next: IteratorResult<unknown>;
        try {
          next = await records.next();
        } catch (error) {
          throw bodyError(error, `the logs of command ${this.cmdId}`);
        }
        if (next.done) break;
        const record = asOutputRecord(next.value);
        if (record.type === "stdout" || record.type === "stderr") {
          yield { kind: "output", stream: record.type, bytes: outputBytes(record) };
        } else if (record.type === "exit") {
          yield { kind: "exit", exit: exitFromRecord(record) };
          return;
        }
      }
    } finally {
      res.destroy();
    }
  }

  private async *poll(
    signal: AbortSignal | undefined,
  ): AsyncGenerator<{ kind: "output"; stream: StreamName; bytes: Buffer } | { kind: "exit"; exit: CommandExitInfo }> {
    const sent = { stdout: 0, stderr: 0 };
    for (let delay = 100; ; delay = Math.min(delay * 2, 1000)) {
      const info = await this.info({ ...(signal ? { signal } : {}) });
      for (const stream of ["stdout", "stderr"] as const) {
        const kept = infoOutput(info, stream);
        const dropped = stream === "stdout" ? info.stdout_dropped_bytes : info.stderr_dropped_bytes;
        const total = dropped + kept.length;
        if (total > sent[stream]) {
          const from = Math.max(0, sent[stream] - dropped);
          yield { kind: "output", stream, bytes: kept.subarray(from) };
          sent[stream] = total;
        }
      }
      if (info.status === "finished") {
        yield { kind: "exit", exit: exitFromInfo(info) };
        return;
      }
      await sleep(delay, signal);
    }
  }
}

/** A command that has ended: its exit and its whole output. */
export class CommandFinished extends Command {
  private readonly _exitCode: number | null;
  /** The signal that ended it (9 when killed by SIGKILL), else null. */
  readonly signal: number | null;
  /** Its `timeout` ran out (it was killed). */
  readonly timedOut: boolean;
  /** Why its end is unknown (the agent connection failed), else null. */
  readonly error: string | null;
  /** How long it ran, in ms. */
  readonly durationMs: number | null;
  private readonly output: OutputLog;

  constructor(init: CommandInit & { exit: CommandExitInfo; output: OutputLog }) {
    super(init);
    this._exitCode = init.exit.exitCode;
    this.signal = init.exit.signal;
    this.timedOut = init.exit.timedOut;
    this.error = init.exit.error;
    this.durationMs = init.exit.durationMs;
    this.output = init.output;
  }

  /** Its exit code; null when a signal (or its timeout) ended it. */
  override get exitCode(): number | null {
    return this._exitCode;
  }

  /** Its output, in order. */
  override async *logs(): AsyncGenerator<LogLine> {
    yield* this.output.lines();
  }

  override async wait(): Promise<CommandFinished> {
    return this;
  }

  /** Its whole stdout, decoded as UTF-8. */
  override async stdout(): Promise<string> {
    return this.output.bytes("stdout").toString("utf8");
  }

  /** Its whole stderr, decoded as UTF-8. */
  override async stderr(): Promise<string> {
    return this.output.bytes("stderr").toString("utf8");
  }

  /** Its whole stdout, exact bytes. */
  override async stdoutBytes(): Promise<Buffer> {
    return this.output.bytes("stdout");
  }

  /** Its whole stderr, exact bytes. */
  override async stderrBytes(): Promise<Buffer> {
    return this.output.bytes("stderr");
  }

  /** stdout and stderr as they were interleaved, decoded as UTF-8. */
  async outputText(): Promise<string> {
    return this.output.bytes("both").toString("utf8");
  }
}

function exitFromRecord(record: Extract<OutputRecord, { type: "exit" }>): CommandExitInfo {
  return {
    exitCode: record.exit_code ?? null,
    signal: record.signal ?? null,
    timedOut: record.timed_out,
    error: record.error ?? null,
    durationMs: record.duration_ms ?? null,
  };
}

function exitFromInfo(info: CommandInfo): CommandExitInfo {
  return {
    exitCode: info.exit_code ?? null,
    signal: info.signal ?? null,
    timedOut: info.timed_out,
    error: info.error ?? null,
    durationMs: info.duration_ms ?? null,
  };
}

function infoOutput(info: CommandInfo, stream: StreamName): Buffer {
  const text = stream === "stdout" ? info.stdout : info.stderr;
  const b64 = stream === "stdout" ? info.stdout_base64 : info.stderr_base64;
  if (typeof text === "string") return Buffer.from(text, "utf8");
  if (typeof b64 === "string") return Buffer.from(b64, "base64");
  return Buffer.alloc(0);
}

/** A 404/405 of the router itself (an older service without the endpoint), not of a command. */
function isMissingEndpoint(error: unknown): boolean {
  if (!(error instanceof EmberError)) return false;
  if (error.status === 405) return true;
  return error instanceof NotFoundError && /no such endpoint/i.test(error.message);
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(abortError(signal));
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortError(signal as AbortSignal));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** Options of an attached (streamed) run. */
export interface AttachedRunOptions {
  stdout?: Writable | undefined;
  stderr?: Writable | undefined;
  signal?: AbortSignal | undefined;
  /** The signal sent when `signal` aborts (default SIGKILL). */
  killSignal?: Signal | undefined;
  /** Called as soon as the answer says the request resumed the sandbox (`ember-resumed`). */
  onResumed?: ((how: ResumedHow) => void) | undefined;
}

/**
 * Runs a command and streams its output (`POST …/exec`, NDJSON): resolves once it exits.
 * Aborting `signal` kills it (SIGKILL unless `killSignal` says otherwise); it then resolves
 * with the signal set.
 */
export async function runAttached(
  connection: Connection,
  sandboxId: string,
  body: ExecBody,
  options: AttachedRunOptions = {},
): Promise<CommandFinished> {
  const { signal } = options;
  if (signal?.aborted) throw abortError(signal);
  const killWith = signalNumber(options.killSignal ?? "SIGKILL");
  let cmdId: string | undefined;
  let aborted = false;
  let killing: Promise<void> | undefined;
  const kill = () => {
    if (cmdId === undefined || killing !== undefined) return;
    const kill: KillBody = { signal: killWith };
    killing = connection.json<unknown>("killCommand", { params: { id: sandboxId, cid: cmdId }, json: kill }).then(
      () => undefined,
      (error: unknown) => {
        // It finished in the meantime: its exit record is on its way.
        if (error instanceof ConflictError || error instanceof NotFoundError) return;
        throw error;
      },
    );
    killing.catch(() => undefined);
  };
  const onAbort = () => {
    aborted = true;
    kill();
  };
  signal?.addEventListener("abort", onAbort, { once: true });
  let res: Response | undefined;
  try {
    res = await connection.request("exec", { params: { id: sandboxId }, json: body });
    if (res.statusCode === 202) {
      // A detached answer to an attached request: not what was asked.
      const text = (await readBody(res)).toString("utf8");
      throw new ProtocolError(`exec answered 202 to an attached command: ${text.slice(0, 200)}`);
    }
    const resumed = resumedFrom(res.headers);
    if (resumed !== null) options.onResumed?.(resumed);
    let command: Command | undefined;
    const output = new OutputLog();
    const records = parseNdjson(res);
    for (;;) {
      let next: IteratorResult<unknown>;
      try {
        next = await records.next();
      } catch (error) {
        throw bodyError(error, `the output of ${cmdId ?? body.cmd}`);
      }
      if (next.done) break;
      const record = asOutputRecord(next.value);
      switch (record.type) {
        case "started":
          cmdId = record.cmd_id;
          command = new Command({
            connection,
            sandboxId,
            cmdId,
            pid: record.pid,
            argv: [body.cmd, ...(body.args ?? [])],
            startedAt: Date.now(),
            resumed,
          });
          if (aborted) kill();
          break;
        case "stdout":
        case "stderr": {
          const bytes = outputBytes(record);
          output.push(record.type, bytes);
          await writeTo(record.type === "stdout" ? options.stdout : options.stderr, bytes);
          break;
        }
        case "exit": {
          if (command === undefined) throw new ProtocolError("the exec stream has an exit record but no started record");
          if (killing) await killing.catch(() => undefined);
          return new CommandFinished({
            connection,
            sandboxId,
            cmdId: command.cmdId,
            pid: command.pid,
            argv: command.argv,
            startedAt: command.startedAt,
            resumed,
            exit: exitFromRecord(record),
            output,
          });
        }
      }
    }
    throw new ProtocolError(
      `the output stream of ${cmdId ?? "the command"} ended before its exit record (the connection was cut)`,
      { code: "incomplete_stream" },
    );
  } finally {
    signal?.removeEventListener("abort", onAbort);
    res?.destroy();
  }
}

/** Copies a running command's logs into sinks (detached runs with `stdout`/`stderr`). */
export async function pipeLogs(command: Command, stdout: Writable | undefined, stderr: Writable | undefined): Promise<void> {
  for await (const line of command.logs()) {
    await writeTo(line.stream === "stdout" ? stdout : stderr, line.bytes);
  }
}
