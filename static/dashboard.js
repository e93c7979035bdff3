// The dashboard: every job, live. Classic script on purpose: it uses window.ProgressClient.
(function () {
  "use strict";
  var F = window.ProgressFormat;
  var MAX_ROWS = 200; // rows kept; the oldest finished ones go first
  var BUCKET_MS = 5000, BUCKETS = 60; // chart: 5 s bars over 5 minutes
  var STATES = ["queued", "running", "succeeded", "failed", "cancelled"];
  var FINAL = { succeeded: 1, failed: 1, cancelled: 1 };

  var $ = function (id) { return document.getElementById(id); };
  var tbody = $("rows");
  var template = $("row-template");
  var rows = new Map(); // job id -> {tr, els, seq, doc}
  var counts = {};
  STATES.forEach(function (s) { counts[s] = 0; });
  var filter = { status: "", type: "" };
  var types = new Set();
  var finishedAt = new Map(); // job id -> {t, ok} for the chart (jobs within the window)
  var durations = []; // the last 100 finished jobs' durations, seconds
  var pending = null;

  // -- rows -----------------------------------------------------------------------------------
  function newRow(job) {
    var tr = template.content.firstElementChild.cloneNode(true);
    var q = function (sel) { return tr.querySelector(sel); };
    tr.dataset.job = job.id;
    var code = q(".job-id");
    code.textContent = job.id;
    q(".job-link").href = "/dashboard/jobs/" + encodeURIComponent(job.id); // the job's own page
    code.title = job.id;
    q(".type").textContent = job.type;
    q(".created").textContent = F.time(job.created_at);
    var els = { status: q(".status"), bar: q(".bar"), pct: q(".pct"), message: q(".message"), time: q(".time") };
    els.bar.setAttribute("aria-label", "Progress of " + job.id);
    return { tr: tr, els: els, seq: 0, doc: job };
  }

  function insert(row) {
    var created = row.doc.created_at;
    for (var el = tbody.firstElementChild; el; el = el.nextElementSibling) {
      var other = rows.get(el.dataset.job);
      if (other && other.doc.created_at < created) { tbody.insertBefore(row.tr, el); return; }
    }
    tbody.appendChild(row.tr);
  }

  function evict() {
    var victim = null;
    for (var el = tbody.lastElementChild; el; el = el.previousElementSibling) {
      var row = rows.get(el.dataset.job);
      if (row && FINAL[row.doc.status]) { victim = row; break; }
    }
    victim = victim || rows.get(tbody.lastElementChild.dataset.job);
    victim.tr.remove();
    rows.delete(victim.doc.id);
    counts[victim.doc.status]--;
  }

  function oldest() {
    var el = tbody.lastElementChild;
    return el ? rows.get(el.dataset.job).doc.created_at : "";
  }

  function render(job) {
    if (!job || !job.id) return;
    var row = rows.get(job.id);
    if (row && job.seq <= row.seq) return;
    if (!row) {
      if (rows.size >= MAX_ROWS && job.created_at < oldest()) return; // older than everything kept
      row = newRow(job);
      rows.set(job.id, row);
      insert(row);
      if (rows.size > MAX_ROWS) evict();
      addType(job.type);
    } else {
      counts[row.doc.status]--;
    }
    row.seq = job.seq;
    row.doc = job;
    counts[job.status]++;
    var els = row.els;
    row.tr.dataset.status = job.status;
    row.tr.dataset.seq = job.seq;
    els.status.textContent = job.status;
    F.bar(els.bar, job);
    els.pct.textContent = F.percent(job.status === "succeeded" ? 100 : job.progress);
    els.message.textContent = job.error ? job.error.type + ": " + job.error.message
      : job.message || (job.status === "queued" ? "waiting for a worker" : job.status === "running" ? "started" : "");
    if (FINAL[job.status]) {
      var d = F.duration(job);
      els.time.textContent = d == null ? "" : F.seconds(d);
      finish(job, d);
    } else {
      els.time.textContent = job.eta_s != null ? F.seconds(job.eta_s) + " left" : "";
    }
    row.tr.hidden = !matches(job);
    later();
  }

  // -- counts, filters ------------------------------------------------------------------------
  function matches(job) {
    return (!filter.status || job.status === filter.status) && (!filter.type || job.type === filter.type);
  }

  function addType(type) {
    if (types.has(type) || types.size >= 50) return;
    types.add(type);
    var select = $("filter-type"), option = new Option(type, type);
    for (var i = 1; i < select.options.length; i++) {
      if (select.options[i].value > type) { select.add(option, i); return; }
    }
    select.add(option);
  }

  function applyFilter() {
    filter.status = $("filter-status").value;
    filter.type = $("filter-type").value;
    rows.forEach(function (row) { row.tr.hidden = !matches(row.doc); });
    later();
  }

  function later() { // batch the summary work of many updates into one pass
    if (!pending) pending = setTimeout(flush, 100);
  }

  function flush() {
    pending = null;
    STATES.forEach(function (s) { $("count-" + s).textContent = String(counts[s]); });
    var shown = 0;
    rows.forEach(function (row) { if (!row.tr.hidden) shown++; });
    $("shown").textContent = rows.size ? "Showing " + shown + " of " + rows.size + " jobs." : "";
    $("empty").hidden = rows.size > 0;
    draw();
  }

  // -- chart ----------------------------------------------------------------------------------
  var SVG = "http://www.w3.org/2000/svg";
  var svg = $("chart"), bars = [], W = 600, TOP = 18, BASE = 130;
  function el(name, attrs, parent) {
    var node = document.createElementNS(SVG, name);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    parent.appendChild(node);
    return node;
  }
  (function buildChart() {
    el("line", { x1: 0, x2: W, y1: BASE + 0.5, y2: BASE + 0.5, class: "axis" }, svg);
    el("line", { x1: 0, x2: W, y1: TOP + 0.5, y2: TOP + 0.5, class: "grid" }, svg);
    var step = W / BUCKETS;
    for (var i = 0; i < BUCKETS; i++) {
      bars.push({
        ok: el("rect", { x: i * step + 1, width: step - 2, y: BASE, height: 0, class: "ok" }, svg),
        bad: el("rect", { x: i * step + 1, width: step - 2, y: BASE, height: 0, class: "bad" }, svg),
      });
    }
  })();

  function finish(job, d) {
    var t = Date.parse(job.finished_at || job.updated_at) || Date.now();
    if (Date.now() - t > BUCKET_MS * BUCKETS || finishedAt.has(job.id)) return;
    finishedAt.set(job.id, { t: t, ok: job.status === "succeeded" });
    if (d != null) {
      durations.push(d);
      if (durations.length > 100) durations.shift();
    }
  }

  var drawn = "";
  function draw() {
    var now = Date.now(), end = Math.floor(now / BUCKET_MS), start = end - BUCKETS + 1;
    var ok = new Array(BUCKETS).fill(0), bad = new Array(BUCKETS).fill(0), total = 0, failed = 0;
    finishedAt.forEach(function (v, id) {
      var b = Math.floor(v.t / BUCKET_MS) - start;
      if (b < 0) { finishedAt.delete(id); return; }
      b = Math.min(b, BUCKETS - 1);
      (v.ok ? ok : bad)[b]++;
      total++;
      if (!v.ok) failed++;
    });
    var key = start + ":" + ok.join() + ":" + bad.join();
    if (key === drawn) return;
    drawn = key;
    var max = 1;
    for (var i = 0; i < BUCKETS; i++) max = Math.max(max, ok[i] + bad[i]);
    var scale = (BASE - TOP) / max;
    for (i = 0; i < BUCKETS; i++) {
      var hOk = ok[i] * scale, hBad = bad[i] * scale;
      bars[i].ok.setAttribute("y", BASE - hOk);
      bars[i].ok.setAttribute("height", hOk);
      bars[i].bad.setAttribute("y", BASE - hOk - hBad);
      bars[i].bad.setAttribute("height", hBad);
    }
    $("chart-max").textContent = "scale: " + max + " per 5 s";
    var sorted = durations.slice().sort(function (a, b) { return a - b; });
    var median = sorted.length ? sorted[Math.floor(sorted.length / 2)] : null;
    $("chart-summary").textContent = total
      ? total + " finished in the last 5 minutes, " + failed + " failed or cancelled" +
        (median != null ? "; median duration " + F.seconds(median) + "." : ".")
      : "No job finished in the last 5 minutes.";
  }
  setInterval(draw, 1000); // the window slides even when nothing happens

  // -- wiring ---------------------------------------------------------------------------------
  $("filters").addEventListener("change", applyFilter);
  $("filters").addEventListener("submit", function (e) { e.preventDefault(); });

  var wasLive = false;
  var watcher = window.ProgressClient.watchJobs("all", {
    onUpdate: render,
    onError: function (e) { // e.g. a server with API keys: the page needs a ticket (option `ticket`)
      if (!e.job) $("transport-text").textContent = e.message + " (HTTP " + e.status + ")";
    },
    onTransport: function (name, live) {
      wasLive = wasLive || live;
      var t = $("transport");
      t.dataset.transport = name;
      t.dataset.live = String(live);
      $("transport-text").textContent = F.transport(name, live, wasLive);
    },
  });
  window.__watcher = watcher;
  window.__dashboard = { render: render, rows: rows };

  // -- workers and queues (GET /workers, GET /queues, every 5 s) ---------------------------------
  function fillTable(body, items, key, cellsOf) { // one row per item, its first cell a row header
    body.replaceChildren();
    items.forEach(function (item) {
      var tr = body.insertRow();
      tr.dataset[key] = item[key === "worker" ? "id" : "name"];
      cellsOf(item).forEach(function (text, i) {
        var cell = i ? tr.insertCell() : document.createElement("th");
        if (!i) { cell.scope = "row"; tr.appendChild(cell); }
        cell.textContent = text;
      });
    });
  }
  function showWorkers(items) {
    fillTable($("workers"), items, "worker", function (w) {
      return [w.id + " (pid " + w.pid + ")", w.types.join(", "), w.running + " of " + w.concurrency, F.time(w.beat_at)];
    });
    $("no-workers").hidden = items.length > 0;
  }
  function showQueues(items) {
    fillTable($("queues"), items, "queue", function (q) {
      var oldest = q.oldest_waiting_s === null ? "–" : F.seconds(q.oldest_waiting_s);
      return [q.name, String(q.waiting), oldest, q.running + " of " + q.limit, String(q.workers)];
    });
  }
  function poll(path, show) {
    fetch(path, { headers: { accept: "application/json" }, cache: "no-store" })
      .then(function (res) { return res.ok ? res.json() : null; })
      .then(function (page) { if (page) show(page.items); })
      .catch(function () { /* shown again at the next poll */ });
  }
  function pollBoth() { poll("/workers", showWorkers); poll("/queues", showQueues); }
  pollBoth();
  setInterval(pollBoth, 5000);

  fetch("/jobs?limit=100", { headers: { accept: "application/json" }, cache: "no-store" })
    .then(function (res) { return res.ok ? res.json() : { items: [] }; })
    .then(function (page) { page.items.forEach(render); })
    .catch(function () { /* the live stream fills the page */ })
    .finally(flush);
})();
