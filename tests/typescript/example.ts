// Every option and method of the client, as a user who npm-installed this repository writes them.
// The `@ts-expect-error` lines must stay errors: they show wrong usage is rejected.
import client, {
  watchJob,
  watchJobs,
  type JobDocument,
  type JobStatus,
  type LogGap,
  type LogLine,
  type LogLines,
  type SubmittedJob,
  type Transport,
  type TransportState,
  type WatchError,
  type WatchOptions,
  type Watcher,
} from "progress-server-client";

declare const bar: HTMLProgressElement;
declare const label: HTMLElement;

export async function submitAndWatch(): Promise<Watcher> {
  const res = await fetch("/jobs", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ type: "demo", params: { steps: 20, interval: 0.2 } }),
  });
  const job = (await res.json()) as SubmittedJob;
  return watchJob(job.id, {
    onUpdate(doc, info) {
      bar.value = doc.progress ?? 0;
      label.textContent = `${doc.message ?? doc.status} (seq ${doc.seq}, over ${info.transport})`;
      if (doc.stage !== null) label.title = doc.stage;
      if (doc.eta_s !== null && !doc.stalled) label.dataset.eta = doc.eta_s.toFixed(0);
      if (doc.error) label.title = `${doc.error.type}: ${doc.error.message}`;
      const started: string | null = doc.started_at;
      void [doc.id, doc.type, doc.attempt, doc.created_at, doc.updated_at, doc.finished_at, started, doc.links.result];
    },
    onDone(doc) {
      const done: JobStatus = doc.status;
      label.textContent = done;
    },
    onTransport(name: TransportState, live: boolean) {
      console.log(name, live);
    },
    onError(error: WatchError) {
      if (error.job !== null) console.warn(`job ${error.job}: ${error.status} ${error.message}`);
      else console.warn(error.status ?? "no status", error.message);
    },
    token: job.token,
    base: "https://progress.example.com",
    transports: ["websocket", "sse", "long-poll", "poll"],
    upgradeAfter: 10_000,
    logs: true,
    onLog(batch: LogLines) {
      for (const line of batch.lines) {
        const l: LogLine = line;
        console.log(batch.job, l.seq, l.ts, l.level, l.msg, l.extra?.["page"]);
      }
    },
    onLogGap(gap: LogGap) {
      console.log(`${gap.job}: lines ${gap.first} to ${gap.last} skipped`);
    },
  });
}

export function dashboard(getTicket: (jobs: string[] | "all") => Promise<string>): Watcher {
  const opts: WatchOptions = {
    ticket: getTicket,
    since: { j_a: 3, j_b: 7 },
    token: { j_a: "v1.a", j_b: "v1.b" },
    transports: client.transports.filter((t: Transport) => t !== "websocket"),
  };
  const several = watchJobs(["j_a", "j_b"], opts)
    .add("j_c")
    .add("j_d", 12)
    .add("j_e", 0, "v1.e")
    .remove("j_a");
  const last: number | undefined = several.seq("j_b");
  const state: TransportState = several.transport;
  const live: boolean = several.live;
  console.log(last, state, live);
  several.close();

  const synchronousTicket = watchJobs("all", { ticket: (jobs) => (jobs === "all" ? "t_all" : jobs.join(",")) });
  synchronousTicket.close();
  return client.watchJobs("all", { onUpdate: (doc: JobDocument) => console.log(doc.id) });
}

export function wrongUsage(): void {
  watchJob("j_a", {
    onUpdate(doc) {
      // @ts-expect-error: "done" is not a status
      if (doc.status === "done") console.log("never");
      // @ts-expect-error: progress may be null
      bar.value = doc.progress;
      // @ts-expect-error: the document has no `percent`
      console.log(doc.percent);
    },
  });
  // @ts-expect-error: onUpdate gets the document, not a number
  watchJob("j_a", { onUpdate: (percent: number) => console.log(percent) });
  // @ts-expect-error: unknown option
  watchJob("j_a", { onProgress: () => {} });
  // @ts-expect-error: not a transport
  watchJob("j_a", { transports: ["websockets"] });
  // @ts-expect-error: since maps ids to seqs
  watchJob("j_a", { since: 3 });
  // @ts-expect-error: watchJob takes one id; watchJobs takes several
  watchJob(["j_a", "j_b"]);
  // @ts-expect-error: the watcher is not readable-writable
  watchJob("j_a").transport = "sse";
  // @ts-expect-error: add's second argument is a seq
  watchJobs("all").add("j_a", "v1.a");
  // @ts-expect-error: a batch holds lines, not one message
  watchJob("j_a", { logs: true, onLog: (batch) => console.log(batch.msg) });
  // @ts-expect-error: a status, not a transport
  const status: JobStatus = "websocket";
  void status;
}
