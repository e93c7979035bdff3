// The demo page: start demo jobs, one card per job, all fed by one watcher (one connection).
import { watchJobs } from "./progress.mjs";
import "./format.js";

const F = globalThis.ProgressFormat;
const MAX_CARDS = 50;
const $ = (id) => document.getElementById(id);
const list = $("jobs");
const template = $("card-template");
const cards = new Map(); // job id -> {li, els, seq, doc}

// Every document rendered, in order, and every transport change (tests read them: a seq never
// repeats or goes back, and the page says how it is connected).
const renders = (globalThis.__renders = []);
const transports = (globalThis.__transports = []);

const watcher = watchJobs([], {
  onUpdate: (job, info) => render(job, info.transport),
  onDone: (job) => announce(`Job ${job.id} ${job.status}.`),
  onTransport: (name, live) => {
    transports.push({ name, live });
    if (transports.length > 1000) transports.splice(0, 500);
    const el = $("transport");
    el.dataset.transport = name;
    el.dataset.live = String(live);
    $("transport-text").textContent = F.transport(name, live, transports.some((t) => t.live));
  },
  onError: (err) => {
    const card = cards.get(err.job);
    if (card) showError(card, `${err.message} (${err.status})`);
  },
});
globalThis.__watcher = watcher;

function announce(text) {
  $("announce").textContent = text;
}

function newCard(job) {
  const li = template.content.firstElementChild.cloneNode(true);
  const q = (sel) => li.querySelector(sel);
  const els = {
    status: q(".status"), bar: q(".bar"), pct: q(".pct"), message: q(".message"),
    stage: q(".stage"), stageRow: q(".meta-stage"), eta: q(".eta"), etaRow: q(".meta-eta"),
    attempt: q(".attempt"), error: q(".error-text"), cancel: q(".cancel"), result: q(".result"),
    expires: q(".expires"), expiresRow: q(".meta-expires"),
  };
  li.dataset.job = job.id;
  q(".type").textContent = job.type === "group" ? `group of ${job.children.length}` : job.type;
  const id = q(".job-id");
  id.textContent = job.id;
  const title = q(".card-title");
  title.id = `title-${job.id}`;
  els.bar.setAttribute("aria-labelledby", title.id);
  els.cancel.setAttribute("aria-label", `Cancel job ${job.id}`);
  els.result.href = job.links.result;
  const card = { li, els, seq: 0, doc: job };
  cards.set(job.id, card);
  list.prepend(li);
  $("empty").hidden = true;
  trim();
  return card;
}

function render(job, transport) {
  const card = cards.get(job.id) || newCard(job);
  if (job.seq <= card.seq) return; // the client already guarantees this; the page checks too
  card.seq = job.seq;
  card.doc = job;
  renders.push({ id: job.id, seq: job.seq, status: job.status, progress: job.progress, transport });
  if (renders.length > 20000) renders.splice(0, 10000);

  const { li, els } = card;
  const final = ["succeeded", "failed", "cancelled"].includes(job.status);
  li.dataset.status = job.status;
  li.dataset.seq = job.seq;
  li.dataset.progress = job.progress ?? "";
  els.status.textContent = job.status;
  F.bar(els.bar, job);
  els.pct.textContent = F.percent(job.status === "succeeded" ? 100 : job.progress);
  els.message.textContent = job.message || (job.status === "queued" ? "Waiting for a worker…" : "");
  els.stageRow.hidden = !job.stage;
  els.stage.textContent = job.stage || "";
  const eta = final ? "" : F.seconds(job.eta_s);
  els.etaRow.hidden = !eta;
  els.eta.textContent = eta;
  els.attempt.textContent = String(job.attempt);
  els.expiresRow.hidden = !job.expires_at; // a finished job's document and result go then
  els.expires.textContent = job.expires_at ? F.time(job.expires_at) : "";
  if (job.error) showError(card, `${job.error.type}: ${job.error.message}`);
  els.result.hidden = job.status !== "succeeded";
  if (final) {
    $("clear").hidden = false;
    els.cancel.hidden = true;
    els.bar.setAttribute("aria-valuetext", `${job.status}, ${F.percent(job.progress)}`);
  }
}

function showError(card, text) {
  card.els.error.hidden = false;
  card.els.error.textContent = text;
}

function finished(card) {
  return ["succeeded", "failed", "cancelled"].includes(card.doc.status);
}

function remove(id) {
  const card = cards.get(id);
  if (!card) return;
  card.li.remove();
  cards.delete(id);
  watcher.remove(id);
  $("empty").hidden = cards.size > 0;
  $("clear").hidden = ![...cards.values()].some(finished);
}

function trim() { // keep the page small: drop the oldest finished cards beyond MAX_CARDS
  if (cards.size <= MAX_CARDS) return;
  for (const [id, card] of cards) {
    if (cards.size <= MAX_CARDS) break;
    if (finished(card)) remove(id);
  }
}

async function problemText(res) {
  try {
    const p = await res.json();
    return p.detail || p.title || `HTTP ${res.status}`;
  } catch {
    return `HTTP ${res.status}`;
  }
}

$("start").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = e.currentTarget;
  const data = new FormData(form);
  const failAt = String(data.get("fail_at_step") || "").trim();
  const params = {
    steps: Number(data.get("steps")),
    interval: Number(data.get("interval")),
    fail_at_step: failAt ? Number(failAt) : null,
  };
  const error = $("form-error");
  const button = $("start-button");
  button.disabled = true;
  try {
    const res = await fetch("/jobs", {
      method: "POST",
      headers: { "content-type": "application/json", accept: "application/json" },
      body: JSON.stringify({ type: "demo", params }),
    });
    if (res.status !== 202) {
      error.textContent = `Could not start the job: ${await problemText(res)}`;
      error.hidden = false;
      return;
    }
    error.hidden = true;
    const job = await res.json();
    render(job, "http");
    watcher.add(job.id, job.seq, job.token); // the token lets it watch this job when the server has API keys
  } catch (err) {
    error.textContent = `Could not reach the server: ${err.message}`;
    error.hidden = false;
  } finally {
    button.disabled = false;
  }
});

// A group: three children of different lengths and weights, and one overall bar (the group's own
// document). The group and each child are watched on the one connection.
const FORMATS = [
  { name: "720p", steps: 10, interval: 0.15, weight: 1 },
  { name: "1080p", steps: 15, interval: 0.2, weight: 2 },
  { name: "4k", steps: 20, interval: 0.3, weight: 4 },
];
$("start-group").addEventListener("click", async () => {
  const error = $("form-error");
  const button = $("start-group");
  button.disabled = true;
  try {
    const group = FORMATS.map((f) => ({ type: "demo", params: { steps: f.steps, interval: f.interval }, weight: f.weight }));
    const res = await fetch("/jobs", {
      method: "POST",
      headers: { "content-type": "application/json", accept: "application/json" },
      body: JSON.stringify({ group }),
    });
    if (res.status !== 202) {
      error.textContent = `Could not start the group: ${await problemText(res)}`;
      error.hidden = false;
      return;
    }
    error.hidden = true;
    const parent = await res.json();
    for (const child of parent.children) watcher.add(child.id, 0); // their cards come with their first documents
    render(parent, "http");
    watcher.add(parent.id, parent.seq, parent.token);
  } catch (err) {
    error.textContent = `Could not reach the server: ${err.message}`;
    error.hidden = false;
  } finally {
    button.disabled = false;
  }
});

// One listener for every card's cancel button (cards come and go; no listener per card).
list.addEventListener("click", async (e) => {
  const button = e.target.closest("button.cancel");
  if (!button) return;
  const id = button.closest(".card").dataset.job;
  button.disabled = true;
  button.textContent = "Cancelling…";
  try {
    const res = await fetch(`/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
    if (res.ok || res.status === 409) return; // the stream brings the final state
    showError(cards.get(id), `Cancel failed: ${await problemText(res)}`);
  } catch (err) {
    showError(cards.get(id), `Cancel failed: ${err.message}`);
  }
  button.disabled = false;
  button.textContent = "Cancel";
});

$("clear").addEventListener("click", () => {
  for (const [id, card] of cards) if (finished(card)) remove(id);
  $("jobs-heading").focus();
});
