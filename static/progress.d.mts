// Types of progress.mjs (the ES module entry of progress.js), the browser client of progress-server.
// Kept true by tests/test_typescript.py, which type-checks tests/typescript/ against this file.

/** A job's state; the last three are final. */
export type JobStatus = "queued" | "running" | "succeeded" | "failed" | "cancelled";

/** The transports, best first (the order of `transports`). */
export type Transport = "websocket" | "sse" | "long-poll" | "poll";

/** What `onTransport` reports: a transport, `idle` (nothing to watch, or closed) or `offline`. */
export type TransportState = Transport | "idle" | "offline";

/** A failed job's error (also kept on a job re-queued for a retry). */
export interface JobError {
  type: string;
  message: string;
  /** Only on workers running with DEBUG. */
  traceback?: string;
}

/** A child's entry in its group's document. */
export interface GroupChild {
  id: string;
  type: string;
  weight: number;
  status: JobStatus;
}

/** The job document: the same JSON in status answers, SSE `data:`, WebSocket messages and job lists. */
export interface JobDocument {
  id: string;
  type: string;
  /** The named queue it waits in (its type's), and its priority there: 0 to 9, higher first
   * (absent on documents stored before queues existed). */
  queue?: string | null;
  priority?: number;
  /** A group's child: the group's id; a spawned child (`ctx.spawn`): the id of the job that spawned it. */
  parent?: string;
  /** A group's, or a job's that spawned some: its children, in order (its progress counts theirs by weight). */
  children?: GroupChild[];
  status: JobStatus;
  /** 0 to 100, or null before the job reports any. */
  progress: number | null;
  message: string | null;
  stage: string | null;
  /** Rises by one with every change: the resume point. */
  seq: number;
  attempt: number;
  /** ISO 8601 times, UTC. */
  created_at: string;
  started_at: string | null;
  updated_at: string;
  finished_at: string | null;
  /** A finished job's: when its document and result are gone (then 410 Gone). */
  expires_at?: string | null;
  /** Seconds nobody may watch the job (stream, WebSocket subscription, poll) before it is cancelled
   * (its error's type `Unwatched`); null: never (absent on documents stored before this field existed). */
  cancel_when_unwatched?: number | null;
  /** Seconds left, estimated, while running. */
  eta_s: number | null;
  /** A running job that has reported nothing for STALL_AFTER seconds. */
  stalled: boolean;
  error: JobError | null;
  /** The attempts that have ended, oldest first: why a job was retried (absent on documents
   * stored before this field existed). */
  attempts?: AttemptRecord[];
  links: { self: string; events: string; result: string };
}

/** One ended attempt: `retrying` (failed, run again), `requeued` (its worker stopped), `lost` (its
 * worker died), or the final status. */
export interface AttemptRecord {
  attempt: number;
  started_at: string | null;
  ended_at: string;
  outcome: JobStatus | "retrying" | "requeued" | "lost";
  error: JobError | null;
}

/** The answer to `POST /jobs`: the document with the job's watch token (the `token` option). */
export interface SubmittedJob extends JobDocument {
  token: string;
}

/** A line of a job's log (`ctx.log` in the job, and the worker's word on each attempt). */
export interface LogLine {
  /** Counts the job's lines from 1, across attempts. */
  seq: number;
  /** ISO 8601, UTC. */
  ts: string;
  /** "INFO", "WARNING", "ERROR", ... */
  level: string;
  msg: string;
  /** The record's extra fields. */
  extra?: Record<string, unknown>;
}

/** Given to `onLog`: new lines of one job, oldest first, never one twice. */
export interface LogLines {
  job: string;
  lines: LogLine[];
}

/** Given to `onLogGap`: lines `first`..`last` of a job the client skipped (it read too slowly, or
 * they are no longer kept); `GET /jobs/{id}/logs?after=first-1` has those still kept. */
export interface LogGap {
  job: string;
  first: number;
  last: number;
}

/** Given to `onError`. */
export type WatchError =
  /** A job that is unknown (404), expired (410) or not yours (401, 403); it is no longer watched. */
  | { job: string; status: number; message: string }
  /** About the whole watch: listing every job refused (401, 403), or a WebSocket error answer,
   * which may have no status. */
  | { job: null; status: number | undefined; message: string };

export interface WatchOptions {
  /** Every new document, in seq order per job: never a repeat, never backwards. */
  onUpdate?: ((job: JobDocument, info: { transport: Transport }) => void) | undefined;
  /** Once per job, with its final document (after its `onUpdate`). */
  onDone?: ((job: JobDocument) => void) | undefined;
  /** The transport in use and whether it is live, on every change. */
  onTransport?: ((name: TransportState, live: boolean) => void) | undefined;
  onError?: ((error: WatchError) => void) | undefined;
  /** One job's watch token (from `POST /jobs`), or `{id: token}`; needed once the server has API keys. */
  token?: string | Record<string, string> | undefined;
  /** Asked before each WebSocket or SSE connection for a fresh single-use ticket (`POST /tickets`). */
  ticket?: ((jobs: string[] | "all") => string | PromiseLike<string>) | undefined;
  /** Another origin, e.g. `"https://progress.example.com"`; default: this page's. */
  base?: string | undefined;
  /** The seq already rendered, by job id: older documents are not delivered. */
  since?: Record<string, number> | undefined;
  /** A subset of the transports, tried in the usual order (plain polling if none is usable). */
  transports?: readonly Transport[] | undefined;
  /** Milliseconds before a better transport is probed again after a fallback; default 30000. */
  upgradeAfter?: number | undefined;
  /** The jobs' log lines too (`onLog`, `onLogGap`); each job then gets its own stream over SSE. */
  logs?: boolean | undefined;
  /** New log lines of a job, in order, all of them before the job's final document. */
  onLog?: ((batch: LogLines) => void) | undefined;
  /** Log lines skipped (see `LogGap`). */
  onLogGap?: ((gap: LogGap) => void) | undefined;
}

/** What `watchJob` and `watchJobs` return. */
export interface Watcher {
  /** The transport in use (`idle` before connecting and after `close`). */
  readonly transport: TransportState;
  /** Whether it is connected and delivering. */
  readonly live: boolean;
  /** Watch one more job (not with `"all"`): `since` is the seq already rendered, `token` its watch token. */
  add(id: string, since?: number, token?: string): Watcher;
  /** Stop watching a job. */
  remove(id: string): Watcher;
  /** The last seq delivered for a job, if any. */
  seq(id: string): number | undefined;
  /** Stop everything and remove every listener it added. */
  close(): void;
}

/** Watch one job. */
export function watchJob(id: string, opts?: WatchOptions): Watcher;
/** Watch several jobs on one connection, or `"all"` jobs (dashboards). */
export function watchJobs(ids: readonly string[] | "all", opts?: WatchOptions): Watcher;

declare const client: {
  watchJob: typeof watchJob;
  watchJobs: typeof watchJobs;
  /** The transports, best first. */
  transports: Transport[];
};
export default client;
