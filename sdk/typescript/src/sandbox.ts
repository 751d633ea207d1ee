// Sandboxes: one microVM each. The shape follows the Vercel Sandbox SDK (`Sandbox.create`,
// `runCommand`, `writeFiles`, `readFile`, `stop`, ...) on ember's HTTP API.

import { Readable } from "node:stream";
import type { Writable } from "node:stream";

import { Command, CommandFinished, pipeLogs, resumedFrom, runAttached, type ResumedHow, type Signal } from "./command.js";
import { abortError, connectionFor, readBody, type Connection, type ConnectionOptions } from "./connection.js";
import { EmberError, NotFoundError } from "./errors.js";
import type {
  CommandInfo,
  CommandList,
  CreateBody,
  ExecBody,
  ForkBody,
  MkdirBody,
  NetworkMode,
  NetworkPolicy as ApiNetworkPolicy,
  OnTimeout,
  RestoreMode,
  SandboxInfo,
  SandboxList,
  SandboxMetrics,
  SandboxState,
  SnapshotBody,
  SnapshotTaken,
  Suspension,
  TimeoutBody,
} from "./generated/api.js";
import { Snapshot } from "./snapshot.js";

/**
 * Network access: `"deny-all"` (no network device; the default), `"allow-all"` (outgoing
 * connections through NAT, to public addresses), or `{ allow, deny }`: lists of networks
 * (`"192.0.2.0/24"`) and domain names (`"api.example.org"`, `"*.example.com"`). With `allow`
 * the guest reaches only what it names (a name: the addresses it resolves to, for their TTL);
 * `deny` wins over `allow`.
 */
export type NetworkPolicy = "allow-all" | "deny-all" | { allow?: string[]; deny?: string[] };

/** Where a sandbox comes from: a snapshot or a template (a built, snapshotted runtime). */
export type SandboxSource = { type: "snapshot"; snapshotId: string } | { type: "template"; name: string };

export interface SandboxCreateOptions extends ConnectionOptions {
  /** `base` (the default), `python3.13`, `node22`, `node24` or an imported image. */
  runtime?: string;
  /** How long the sandbox lives, in ms (rounded up to whole seconds; default 5 minutes). */
  timeout?: number;
  /** vCPUs and memory (MiB). */
  resources?: { vcpus?: number; memory?: number };
  /** Guest TCP ports to expose (see `domain(port)`). */
  ports?: number[];
  /** Environment of every command. */
  env?: Record<string, string>;
  source?: SandboxSource;
  networkPolicy?: NetworkPolicy;
  /** How a restore's memory arrives (snapshot and template sources only). */
  restoreMode?: RestoreMode;
  /**
   * What its `timeout` (and `idleTimeout`) does: `"stop"` (the default), `"pause"` (the VMM
   * stays, paused: no CPU, memory kept) or `"snapshot"` (saved to the store, its VMM freed).
   * A paused or saved sandbox resumes, same id and processes, on its next command or file
   * request (see `autoResume`, `suspended` and `CommandFinished.resumed`).
   */
  onTimeout?: OnTimeout;
  /** Resume a sandbox suspended by `onTimeout` when it is used again (default true). */
  autoResume?: boolean;
  /**
   * Apply `onTimeout` once nothing has used the sandbox (no command, file or commands request,
   * no command of its running) for this long, in ms (rounded up to whole seconds; at least 2 s).
   */
  idleTimeout?: number;
  signal?: AbortSignal;
}

export interface ForkOptions {
  /** Each clone's lifetime, in ms. */
  timeout?: number;
  env?: Record<string, string>;
  ports?: number[];
  networkPolicy?: NetworkPolicy;
  restoreMode?: RestoreMode;
  signal?: AbortSignal;
}

export interface RunCommandParams {
  cmd: string;
  args?: string[];
  /** Working directory (default: the runtime's, `/home/user` or `/`). */
  cwd?: string;
  env?: Record<string, string>;
  /** Run as root (the runtimes whose commands run as `user` allow it). */
  sudo?: boolean;
  /** Resolve with a running Command at once instead of a CommandFinished at its end. */
  detached?: boolean;
  /** Receives stdout as it arrives. */
  stdout?: Writable;
  /** Receives stderr as it arrives. */
  stderr?: Writable;
  /** Aborting kills the command (SIGKILL, or `killSignal`). */
  signal?: AbortSignal;
  /** The signal an abort sends (default SIGKILL). */
  killSignal?: Signal;
  /** Text or bytes written to the command's stdin (at most 1 MiB). */
  stdin?: string | Buffer | Uint8Array;
  /** Kill the command after this long, in ms (rounded up to whole seconds). */
  timeout?: number;
}

/** A file for `writeFiles`. */
export interface WriteFileEntry {
  /** Absolute path in the guest. */
  path: string;
  content: string | Buffer | Uint8Array | Readable;
  /** Permission bits, e.g. `0o755` or `"755"` (default 644). */
  mode?: number | string;
}

/** Milliseconds to whole seconds, rounded up (the API counts seconds). */
export function msToSeconds(ms: number): number {
  if (!Number.isFinite(ms) || ms <= 0) throw new TypeError(`a timeout must be a positive number of ms, not ${ms}`);
  return Math.ceil(ms / 1000);
}

/** The API's `network` for a network policy. */
export function networkFromPolicy(policy: NetworkPolicy | undefined): NetworkMode | undefined {
  if (policy === undefined) return undefined;
  if (policy === "deny-all") return { mode: "none" };
  if (policy === "allow-all") return { mode: "egress" };
  if (typeof policy === "object" && policy !== null) {
    const { allow, deny } = policy;
    const isList = (list: unknown) => list === undefined || (Array.isArray(list) && list.every((e) => typeof e === "string"));
    if (isList(allow) && isList(deny) && (allow !== undefined || deny !== undefined)) {
      const mode: Extract<NetworkMode, { mode: "egress" }> = { mode: "egress" };
      if (allow !== undefined) mode.allow = [...allow];
      if (deny !== undefined && deny.length > 0) mode.deny = [...deny];
      return mode;
    }
  }
  throw new TypeError(`unknown network policy ${JSON.stringify(policy)}`);
}

/** The `POST /sandboxes` body for create options. */
export function createBody(options: SandboxCreateOptions = {}): CreateBody {
  const body: CreateBody = {};
  if (options.runtime !== undefined) body.runtime = options.runtime;
  if (options.timeout !== undefined) body.timeout_s = msToSeconds(options.timeout);
  if (options.resources?.vcpus !== undefined) body.vcpus = options.resources.vcpus;
  if (options.resources?.memory !== undefined) body.memory_mib = options.resources.memory;
  if (options.ports !== undefined) body.ports = [...options.ports];
  if (options.env !== undefined) body.env = { ...options.env };
  const network = networkFromPolicy(options.networkPolicy);
  if (network !== undefined) body.network = network;
  if (options.restoreMode !== undefined) body.restore_mode = options.restoreMode;
  if (options.onTimeout !== undefined) body.on_timeout = options.onTimeout;
  if (options.autoResume !== undefined) body.auto_resume = options.autoResume;
  if (options.idleTimeout !== undefined) body.idle_timeout_s = msToSeconds(options.idleTimeout);
  const source = options.source;
  if (source !== undefined) {
    if (source.type === "snapshot") body.snapshot = source.snapshotId;
    else if (source.type === "template") body.template = source.name;
    else throw new TypeError(`unsupported source type ${JSON.stringify((source as { type: unknown }).type)}`);
  }
  return body;
}

/** The `POST …/exec` body for runCommand parameters. */
export function execBody(params: RunCommandParams): ExecBody {
  if (typeof params.cmd !== "string" || params.cmd === "") throw new TypeError("runCommand needs a command");
  const body: ExecBody = { cmd: params.cmd };
  if (params.args !== undefined && params.args.length > 0) body.args = [...params.args];
  if (params.cwd !== undefined) body.cwd = params.cwd;
  if (params.env !== undefined) body.env = { ...params.env };
  if (params.sudo) body.user = "root";
  if (params.detached) body.detach = true;
  if (params.timeout !== undefined) body.timeout_s = msToSeconds(params.timeout);
  if (params.stdin !== undefined) {
    if (typeof params.stdin === "string") body.stdin = params.stdin;
    else body.stdin_base64 = Buffer.from(params.stdin.buffer, params.stdin.byteOffset, params.stdin.byteLength).toString("base64");
  }
  return body;
}

function modeText(mode: number | string | undefined): string | undefined {
  if (mode === undefined) return undefined;
  if (typeof mode === "number") return mode.toString(8);
  return mode.replace(/^0o/, "");
}

/** A sandbox: a microVM with a guest agent that runs commands and moves files. */
export class Sandbox {
  /** The sandbox as the service described it last (see `refresh()`). */
  info: SandboxInfo;
  /** @internal */
  readonly connection: Connection;

  /** @internal Use `Sandbox.create()` or `Sandbox.get()`. */
  constructor(connection: Connection, info: SandboxInfo) {
    this.connection = connection;
    this.info = info;
  }

  /** Boots a sandbox (or restores one from a snapshot or template); resolves once it runs. */
  static async create(options: SandboxCreateOptions = {}): Promise<Sandbox> {
    const connection = connectionFor(options);
    const info = await connection.json<SandboxInfo>("createSandbox", {
      json: createBody(options),
      signal: options.signal,
    });
    return new Sandbox(connection, info);
  }

  /** A sandbox by id. Throws NotFoundError when there is none. */
  static async get(
    idOrParams: string | ({ sandboxId: string; signal?: AbortSignal } & ConnectionOptions),
    options: ConnectionOptions = {},
  ): Promise<Sandbox> {
    const params = typeof idOrParams === "string" ? { ...options, sandboxId: idOrParams } : idOrParams;
    const connection = connectionFor(params);
    const signal = "signal" in params ? params.signal : undefined;
    const info = await connection.json<SandboxInfo>("getSandbox", { params: { id: params.sandboxId }, signal });
    return new Sandbox(connection, info);
  }

  /** Every sandbox the service knows, oldest first. */
  static async list(options: ConnectionOptions = {}): Promise<Sandbox[]> {
    const connection = connectionFor(options);
    const list = await connection.json<SandboxList>("listSandboxes");
    return list.sandboxes.map((info) => new Sandbox(connection, info));
  }

  get sandboxId(): string {
    return this.info.id;
  }

  /** `starting`, `running`, `paused`, `stopped` or `failed`, as of the last answer (see `refresh()`). */
  get status(): SandboxState {
    return this.info.state;
  }

  /** When it was created. */
  get createdAt(): Date {
    return new Date(this.info.created_unix_ms);
  }

  /** When it stops unless its timeout is extended. */
  get timeoutAt(): Date {
    return new Date(this.info.timeout_at_unix_ms);
  }

  /** Its lifetime from creation to `timeoutAt`, in ms. */
  get timeout(): number {
    return this.info.timeout_at_unix_ms - this.info.created_unix_ms;
  }

  /**
   * Why and how its `onTimeout` suspended it (`{ reason: "timeout" | "idle", how: "pause" |
   * "snapshot", at_unix_ms, snapshot? }`), or null when it is not suspended: as of the last
   * answer (see `refresh()`). A suspended sandbox shows `status` `paused` (`how: "pause"`) or
   * `stopped` (`how: "snapshot"`), and resumes on its next command or file request.
   */
  get suspended(): Suspension | null {
    return this.info.suspended ?? null;
  }

  /** A response said its request resumed the sandbox: it runs now. */
  private noteResumed(resumed: ResumedHow | null): void {
    if (resumed !== null) this.info = { ...this.info, state: "running", suspended: null };
  }

  /** Reads the sandbox's state again (`status`, `timeoutAt`, ports...). */
  async refresh(options: { signal?: AbortSignal } = {}): Promise<SandboxInfo> {
    this.info = await this.connection.json<SandboxInfo>("getSandbox", {
      params: { id: this.sandboxId },
      signal: options.signal,
    });
    return this.info;
  }

  /**
   * Runs a command. Resolves with a CommandFinished when it exits, or, `detached`, with a
   * running Command as soon as it started.
   */
  runCommand(cmd: string, args?: string[], options?: { signal?: AbortSignal }): Promise<CommandFinished>;
  runCommand(params: RunCommandParams & { detached: true }): Promise<Command>;
  runCommand(params: RunCommandParams & { detached?: false }): Promise<CommandFinished>;
  runCommand(params: RunCommandParams): Promise<Command | CommandFinished>;
  async runCommand(
    cmdOrParams: string | RunCommandParams,
    args?: string[],
    options: { signal?: AbortSignal } = {},
  ): Promise<Command | CommandFinished> {
    const params: RunCommandParams =
      typeof cmdOrParams === "string"
        ? { cmd: cmdOrParams, ...(args ? { args } : {}), ...(options.signal ? { signal: options.signal } : {}) }
        : cmdOrParams;
    const body = execBody(params);
    if (!params.detached) {
      return runAttached(this.connection, this.sandboxId, body, {
        stdout: params.stdout,
        stderr: params.stderr,
        signal: params.signal,
        killSignal: params.killSignal,
        onResumed: (how) => this.noteResumed(how),
      });
    }
    if (params.signal?.aborted) throw abortError(params.signal);
    const { body: info, headers } = await this.connection.jsonWithHeaders<CommandInfo>("exec", {
      params: { id: this.sandboxId },
      json: body,
    });
    const command = new Command({
      connection: this.connection,
      sandboxId: this.sandboxId,
      cmdId: info.cmd_id,
      pid: info.pid,
      argv: info.argv,
      startedAt: info.started_unix_ms,
      resumed: resumedFrom(headers),
    });
    this.noteResumed(command.resumed);
    const signal = params.signal;
    if (signal) {
      const killSignal = params.killSignal ?? "SIGKILL";
      signal.addEventListener("abort", () => void command.kill(killSignal).catch(() => undefined), { once: true });
    }
    if (params.stdout || params.stderr) {
      // Best effort, in the background: the sinks get the output as the logs deliver it.
      void pipeLogs(command, params.stdout, params.stderr).catch(() => undefined);
    }
    return command;
  }

  /** A command of this sandbox by id (running or finished). */
  async getCommand(cmdId: string, options: { signal?: AbortSignal } = {}): Promise<Command> {
    const { body: info, headers } = await this.connection.jsonWithHeaders<CommandInfo>("getCommand", {
      params: { id: this.sandboxId, cid: cmdId },
      signal: options.signal,
    });
    const command = new Command({
      connection: this.connection,
      sandboxId: this.sandboxId,
      cmdId: info.cmd_id,
      pid: info.pid,
      argv: info.argv,
      startedAt: info.started_unix_ms,
      resumed: resumedFrom(headers),
    });
    this.noteResumed(command.resumed);
    return command;
  }

  /**
   * Its commands, oldest first, running and finished (`status`, exit, argv; without their
   * output: `getCommand(cmdId)` for that).
   */
  async listCommands(options: { signal?: AbortSignal } = {}): Promise<CommandInfo[]> {
    const { body, headers } = await this.connection.jsonWithHeaders<CommandList>("listCommands", {
      params: { id: this.sandboxId },
      signal: options.signal,
    });
    this.noteResumed(resumedFrom(headers));
    return body.commands;
  }

  /**
   * One sample of its use of CPU, memory, disk and network: `guest` (its kernel's view: CPUs,
   * CPU time, memory, load; null while it is paused, with `guest_error` saying why) and
   * `host` (its VMM process: CPU time, RSS, cgroup memory, disk and network traffic). Asking
   * does not count as use (a suspended sandbox stays suspended).
   */
  async metrics(options: { signal?: AbortSignal } = {}): Promise<SandboxMetrics> {
    return this.connection.json<SandboxMetrics>("sandboxMetrics", {
      params: { id: this.sandboxId },
      signal: options.signal,
    });
  }

  /** Writes files (each streamed; a Readable content is not buffered). Paths are absolute. */
  async writeFiles(files: WriteFileEntry[], options: { signal?: AbortSignal } = {}): Promise<void> {
    for (const file of files) {
      const content = file.content;
      const res = await this.connection.request("writeFile", {
        params: { id: this.sandboxId },
        query: { path: file.path, mode: modeText(file.mode) },
        body: content instanceof Readable ? content : typeof content === "string" ? content : Buffer.from(content.buffer, content.byteOffset, content.byteLength),
        signal: options.signal,
      });
      await readBody(res);
    }
  }

  /**
   * A file's content as a stream, or null when there is no such file. (A missing sandbox is
   * still a NotFoundError.)
   */
  async readFile(
    pathOrParams: string | { path: string },
    options: { signal?: AbortSignal } = {},
  ): Promise<Readable | null> {
    const path = typeof pathOrParams === "string" ? pathOrParams : pathOrParams.path;
    try {
      return await this.connection.request("readFile", {
        params: { id: this.sandboxId },
        query: { path },
        signal: options.signal,
      });
    } catch (error) {
      if (error instanceof NotFoundError && !isSandboxNotFound(error)) return null;
      throw error;
    }
  }

  /** A file's whole content, or null when there is no such file. */
  async readFileToBuffer(pathOrParams: string | { path: string }, options: { signal?: AbortSignal } = {}): Promise<Buffer | null> {
    const stream = await this.readFile(pathOrParams, options);
    return stream === null ? null : readBody(stream);
  }

  /** Creates a directory and its parents (`mkdir -p`). */
  async mkDir(path: string, options: { mode?: number; signal?: AbortSignal } = {}): Promise<void> {
    const body: MkdirBody = { path };
    if (options.mode !== undefined) body.mode = options.mode;
    await this.connection.json("mkdir", { params: { id: this.sandboxId }, json: body, signal: options.signal });
  }

  /**
   * Saves the sandbox (memory and disk) as a snapshot. Unlike Vercel's, the sandbox keeps
   * running unless `stop` is true.
   */
  async snapshot(options: { name?: string; stop?: boolean; diff?: boolean; signal?: AbortSignal } = {}): Promise<Snapshot> {
    const body: SnapshotBody = {};
    if (options.name !== undefined) body.name = options.name;
    if (options.stop) body.stop = true;
    if (options.diff) body.diff = true;
    const taken = await this.connection.json<SnapshotTaken>("createSnapshot", {
      params: { id: this.sandboxId },
      json: body,
      signal: options.signal,
    });
    const { sandbox, took_ms, ...info } = taken;
    this.info = sandbox;
    return new Snapshot(this.connection, info, took_ms);
  }

  /**
   * `count` copies of this sandbox as it is now (memory included), running: a snapshot, then
   * that many restores of it at once. The snapshot stays in the store.
   */
  async fork(count: number, options: ForkOptions = {}): Promise<Sandbox[]> {
    const snapshot = await this.snapshot(options.signal ? { signal: options.signal } : {});
    return forkSnapshot(this.connection, snapshot.snapshotId, count, options);
  }

  /** Moves the deadline `ms` later (from the deadline the service has now). */
  async extendTimeout(ms: number, options: { signal?: AbortSignal } = {}): Promise<void> {
    if (!Number.isFinite(ms) || ms <= 0) throw new TypeError(`extendTimeout takes a positive number of ms, not ${ms}`);
    const info = await this.refresh(options);
    const body: TimeoutBody = { timeout_s: Math.max(1, Math.ceil((info.timeout_at_unix_ms - Date.now() + ms) / 1000)) };
    this.info = await this.connection.json<SandboxInfo>("setTimeout", {
      params: { id: this.sandboxId },
      json: body,
      signal: options.signal,
    });
  }

  /**
   * Replaces the egress policy of a sandbox created with a network (`"allow-all"` or
   * `{ allow, deny }`): new connections and name lookups follow it at once; connections
   * already made go on.
   */
  async updateNetworkPolicy(policy: NetworkPolicy, options: { signal?: AbortSignal } = {}): Promise<void> {
    const network = networkFromPolicy(policy);
    if (network === undefined || network.mode !== "egress") {
      throw new TypeError("updateNetworkPolicy takes \"allow-all\" or { allow, deny }: a sandbox's network device is chosen at creation");
    }
    const body: ApiNetworkPolicy = {};
    if (network.allow !== undefined) body.allow = network.allow;
    if (network.deny !== undefined) body.deny = network.deny;
    await this.connection.json("updateNetworkPolicy", {
      params: { id: this.sandboxId },
      json: body,
      signal: options.signal,
    });
    await this.refresh(options);
  }

  /**
   * Where an exposed guest port is reached: `http://HOST:PORT` on the service's host (its
   * loopback). The port must have been given in `ports` at creation.
   */
  domain(port: number): string {
    const exposed = this.info.ports.find((p) => p.guest_port === port);
    if (exposed === undefined) {
      throw new EmberError(
        `port ${port} is not exposed by sandbox ${this.sandboxId} (exposed: ${this.info.ports.map((p) => p.guest_port).join(", ") || "none"}); pass it in \`ports\` at creation`,
        { code: "port_not_exposed" },
      );
    }
    return `http://${exposed.host}`;
  }

  /** Stops the sandbox and forgets it. Stopping one that is gone already is not an error. */
  async stop(options: { signal?: AbortSignal } = {}): Promise<void> {
    try {
      await this.connection.json("stopSandbox", { params: { id: this.sandboxId }, signal: options.signal });
      this.info = { ...this.info, state: "stopped" };
    } catch (error) {
      if (error instanceof NotFoundError) return;
      throw error;
    }
  }
}

/** `count` sandboxes restored from a snapshot at once. */
export async function forkSnapshot(
  connection: Connection,
  snapshotId: string,
  count: number,
  options: ForkOptions = {},
): Promise<Sandbox[]> {
  const body: ForkBody = { count };
  if (options.timeout !== undefined) body.timeout_s = msToSeconds(options.timeout);
  if (options.env !== undefined) body.env = { ...options.env };
  if (options.ports !== undefined) body.ports = [...options.ports];
  const network = networkFromPolicy(options.networkPolicy);
  if (network !== undefined) body.network = network;
  if (options.restoreMode !== undefined) body.restore_mode = options.restoreMode;
  const list = await connection.json<SandboxList>("forkSnapshot", {
    params: { id: snapshotId },
    json: body,
    signal: options.signal,
  });
  return list.sandboxes.map((info) => new Sandbox(connection, info));
}

/**
 * Whether a 404 is about the sandbox itself (`no sandbox "…"`) rather than a file in it. The
 * API gives both the code `not_found`; only the message tells them apart.
 */
function isSandboxNotFound(error: NotFoundError): boolean {
  return /^no sandbox\b/i.test(error.message) || /no such endpoint/i.test(error.message);
}
