// /dashboard/jobs/{id}: one job, live: its state, timeline, params and log. Classic script on
// purpose: it uses window.ProgressClient with logs, like any page would.
(function () {
  "use strict";
  var F = window.ProgressFormat;
  var FINAL = { succeeded: 1, failed: 1, cancelled: 1 };
  var MAX_LINES = 2000; // log lines kept on the page (the oldest go first)
  var $ = function (id) { return document.getElementById(id); };
  var jobId = decodeURIComponent(location.pathname.split("/").pop());
  var token = new URLSearchParams(location.search).get("token"); // a watch token, on servers with API keys
  var auth = token ? "?token=" + encodeURIComponent(token) : "";
  var doc = null, watcher = null, lines = 0;

  function api(path, init) { return fetch("/jobs/" + encodeURIComponent(jobId) + path + auth, init); }
  async function problemText(res) {
    try { var p = await res.json(); return p.detail || p.title || "HTTP " + res.status; } catch (e) { return "HTTP " + res.status; }
  }
  function fail(text) { $("page-error").hidden = false; $("page-error").textContent = text; }

  function item(when, text, kind) {
    var li = document.createElement("li");
    if (kind) li.dataset.kind = kind;
    var t = document.createElement("time");
    t.dateTime = when || "";
    t.textContent = when ? F.time(when) : "";
    var s = document.createElement("span");
    s.textContent = text;
    li.append(t, " ", s);
    return li;
  }

  function timeline(job) {
    var ol = $("timeline");
    ol.replaceChildren();
    ol.append(item(job.created_at, "queued", "queued"));
    (job.attempts || []).forEach(function (a) {
      ol.append(item(a.started_at, "attempt " + a.attempt + " started", "running"));
      var why = a.error ? ": " + a.error.type + ": " + a.error.message : "";
      ol.append(item(a.ended_at, "attempt " + a.attempt + " " + a.outcome + why, a.outcome));
    });
    var ended = (job.attempts || []).some(function (a) { return a.attempt === job.attempt; });
    if (job.started_at && job.attempt && !ended) ol.append(item(job.started_at, "attempt " + job.attempt + " started", "running"));
    if (FINAL[job.status] && !ended) ol.append(item(job.finished_at, job.status, job.status)); // e.g. cancelled while queued
  }

  function render(job) {
    doc = job;
    var final = !!FINAL[job.status];
    document.title = "Job " + job.id + " · " + job.status;
    $("job").dataset.status = job.status;
    $("job").dataset.seq = job.seq;
    $("type").textContent = job.type;
    $("status").textContent = job.status;
    F.bar($("bar"), job);
    $("pct").textContent = F.percent(job.status === "succeeded" ? 100 : job.progress);
    $("message").textContent = job.message || (job.status === "queued" ? "Waiting for a worker…" : "");
    $("stage-row").hidden = !job.stage;
    $("stage").textContent = job.stage || "";
    var eta = final ? "" : F.seconds(job.eta_s);
    $("eta-row").hidden = !eta;
    $("eta").textContent = eta;
    $("attempt").textContent = String(job.attempt);
    $("expires-row").hidden = !job.expires_at; // a finished job's document, result and log go then
    $("expires").textContent = job.expires_at ? new Date(job.expires_at).toLocaleString() : "";
    $("error").hidden = !job.error;
    $("error-text").textContent = job.error ? job.error.type + ": " + job.error.message : "";
    $("traceback").hidden = !(job.error && job.error.traceback);
    $("traceback").textContent = (job.error && job.error.traceback) || "";
    $("cancel").hidden = final;
    $("retry").hidden = !(job.status === "failed" || job.status === "cancelled");
    $("result").hidden = job.status !== "succeeded";
    $("result").href = job.links.result + auth;
    $("bar").setAttribute("aria-valuetext", job.status + ", " + F.percent(job.progress));
    if (job.type === "group") $("retry").hidden = true; // a group is not retried whole: its jobs are
    family(job);
    timeline(job);
  }

  // A group's jobs or a job's spawned children (each a link to its own page), and its own group or parent.
  function family(job) {
    var kids = job.children || [];
    $("family").hidden = !kids.length && !job.parent;
    $("family-heading").textContent = !kids.length ? "Part of" : job.type === "group" ? "Jobs in this group" : "Jobs it spawned";
    $("parent-row").hidden = !job.parent;
    if (job.parent) {
      $("parent").href = "/dashboard/jobs/" + encodeURIComponent(job.parent) + auth;
      $("parent").textContent = job.parent;
    }
    var ol = $("children");
    ol.replaceChildren();
    kids.forEach(function (c) {
      var li = document.createElement("li"), a = document.createElement("a");
      li.dataset.status = c.status;
      a.href = "/dashboard/jobs/" + encodeURIComponent(c.id) + auth;
      a.textContent = c.type + " " + c.id;
      li.append(a, " · weight " + c.weight + " · ", c.status);
      ol.append(li);
    });
  }

  function logLine(l) {
    var li = document.createElement("li");
    li.dataset.seq = l.seq;
    li.dataset.level = l.level;
    var t = document.createElement("time");
    t.dateTime = l.ts;
    t.textContent = F.time(l.ts);
    var lv = document.createElement("span");
    lv.className = "level";
    lv.textContent = l.level;
    var msg = document.createElement("span");
    msg.className = "msg";
    msg.textContent = l.msg; // text, never HTML: a line is whatever the job logged
    li.append(t, " ", lv, " ", msg);
    return li;
  }
  function addLines(items) {
    var ol = $("log");
    var fragment = document.createDocumentFragment();
    items.forEach(function (l) { fragment.append(logLine(l)); });
    ol.append(fragment);
    lines += items.length;
    while (lines > MAX_LINES) { ol.firstElementChild.remove(); lines--; }
    $("log-empty").hidden = lines > 0;
  }
  function gap(g) {
    var li = document.createElement("li");
    li.dataset.kind = "gap";
    li.textContent = "… lines " + g.first + " to " + g.last + " skipped (read them with GET /jobs/" + g.job + "/logs?after=" + (g.first - 1) + ")";
    $("log").append(li);
  }

  function watch() {
    var opts = {
      logs: true,
      onUpdate: render,
      onLog: function (b) { addLines(b.lines); },
      onLogGap: gap,
      onTransport: function (name, live) {
        $("transport").dataset.transport = name;
        $("transport").dataset.live = String(live);
        $("transport-text").textContent = F.transport(name, live, false);
      },
      onError: function (e) { if (e.job) fail("Job " + e.job + ": " + e.message + " (HTTP " + e.status + ")"); },
    };
    if (token) opts.token = token;
    watcher = window.ProgressClient.watchJob(jobId, opts);
    window.__jobWatcher = watcher;
  }

  $("cancel").addEventListener("click", async function () {
    var res = await api("", { method: "DELETE" });
    if (!res.ok) fail("Cancel refused: " + await problemText(res));
  });
  $("retry").addEventListener("click", async function () {
    var res = await api("/retry", { method: "POST" });
    if (!res.ok) { fail("Retry refused: " + await problemText(res)); return; }
    var job = await res.json();
    $("page-error").hidden = true;
    render(job);
    watcher.add(jobId, job.seq, token || undefined); // watched again from here (its log goes on from the last line)
  });

  $("job-id").textContent = jobId;
  api("/params").then(async function (res) {
    $("params").textContent = res.ok ? JSON.stringify(await res.json(), null, 2) : await problemText(res);
  }, function () { $("params").textContent = "(could not be read)"; });
  watch();
})();
