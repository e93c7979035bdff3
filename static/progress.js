/*! progress.js: browser client of progress-server; no dependencies, no build step. MIT.
 * Plain script: <script src="/static/progress.js"> gives window.ProgressClient;
 * module: import { watchJob, watchJobs } from "/static/progress.mjs".
 *
 *   const w = ProgressClient.watchJob(job.id, {
 *     onUpdate(job) { bar.value = job.progress ?? 0; label.textContent = job.message ?? job.status; },
 *     onDone(job) { label.textContent = job.status; },  // once, with the final document
 *     onTransport(name, live) {},  // websocket | sse | long-poll | poll | idle | offline
 *     token: job.token,            // the job's watch token from POST /jobs (servers with API keys)
 *   });
 *   w.close();                     // stops everything, removes every listener
 *
 * watchJobs([ids], opts) shares one connection (w.add(id, since, token), w.remove(id));
 * watchJobs("all", opts) is every job. More options: onError({job, status, message}), token as
 * {id: token}, ticket: async (ids | "all") => a fresh POST /tickets ticket per stream, base,
 * since: {id: seq}, transports: a subset of LEVELS, upgradeAfter: ms (30000), and logs: true
 * with onLog({job, lines}) and onLogGap({job, first, last}) for the jobs' log lines (in order,
 * never twice, all of a job's before its final document).
 * Transports in order: WebSocket, SSE, long poll, poll; one that is refused or keeps failing is
 * left for the next and better ones are probed again later. Each reconnect resumes from the last
 * seq, and deliver() drops any seq not above the last one shown: never a repeat, never backwards.
 */
(function (root) {
  "use strict";
  var LEVELS = ["websocket", "sse", "long-poll", "poll"];
  var EVENTS = ["progress", "succeeded", "failed", "cancelled"];
  var FINAL = { succeeded: 1, failed: 1, cancelled: 1 };
  var HEALTHY_MS = 3000; // a connection that lives this long (or delivers) counts as working
  var WAIT_S = 25; // long poll hold
  var MAX_SEQS = 2000; // remembered jobs (for dashboards that run for hours)

  function noop() {}

  function watchJobs(ids, opts) {
    opts = opts || {};
    var all = ids === "all";
    var doc = root.document;
    var base = opts.base ? String(opts.base).replace(/\/+$/, "") : "";
    var seqs = new Map(); // job id -> last seq delivered
    var logSeqs = new Map(); // job id -> last log seq delivered (opts.logs)
    var active = new Set(); // jobs not final yet (ids mode)
    var cursor = null; // resume cursor of the multi-job SSE stream
    var tokens = new Map(); // job id -> its watch token (from POST /jobs), for servers with API keys
    if (typeof opts.token === "string") { // watchJob(id, {token}): that job's
      if (!all) (ids || []).forEach(function (id) { tokens.set(id, opts.token); });
    } else if (opts.token && typeof opts.token === "object") {
      Object.keys(opts.token).forEach(function (id) { tokens.set(id, opts.token[id]); });
    }
    var allowed = opts.transports || LEVELS;
    var levels = LEVELS.map(function (name, i) {
      var ok = allowed.indexOf(name) >= 0 &&
        !(i === 0 && !root.WebSocket) && !(i === 1 && !root.EventSource) && !(all && i === 2);
      return ok ? i : -1;
    }).filter(function (i) { return i >= 0; });
    if (!levels.length) levels = [3];
    var li = 0; // index into levels of the current transport
    var worked = {}; // level -> it has worked at least once
    var failures = 0;
    var current = null, probe = null, closed = false;
    var retryTimer = null, upgradeTimer = null, upgradeDelay = opts.upgradeAfter || 30000;
    var shown = "";
    var hiddenAt = 0, lastTick = Date.now();

    function call(fn) {
      if (!fn) return;
      try { fn.apply(null, [].slice.call(arguments, 1)); } catch (e) { setTimeout(function () { throw e; }); }
    }
    function report(name, live) {
      if (shown === name + live) return;
      shown = name + live;
      handle.transport = name;
      handle.live = live;
      call(opts.onTransport, name, live);
    }
    function q(params, ids, ticket) { // query string, with a credential good for these jobs
      var tok = null;
      (ids || []).forEach(function (id) { tok = tok || tokens.get(id); });
      if (ticket) params.push("ticket=" + encodeURIComponent(ticket));
      else if (tok) params.push("token=" + encodeURIComponent(tok));
      return params.length ? "?" + params.join("&") : "";
    }
    function jobURL(id, tail) { return base + "/jobs/" + encodeURIComponent(id) + (tail || ""); }
    function backoff(n) { // equal jitter: half fixed, half random
      var d = Math.min(30000, 250 * Math.pow(2, n));
      return d / 2 + Math.random() * d / 2;
    }
    function wanted() { return all || active.size > 0; }
    function remember(id, seq) {
      seqs.delete(id);
      seqs.set(id, seq);
      if (seqs.size > MAX_SEQS) {
        for (var k of seqs.keys()) { if (!active.has(k)) { seqs.delete(k); break; } }
      }
    }

    // The one gate every document goes through.
    function deliver(d, t) {
      if (!d || typeof d.id !== "string" || typeof d.seq !== "number") return;
      if (!all && !active.has(d.id)) return;
      var last = seqs.get(d.id);
      if (last !== undefined && d.seq <= last) return;
      remember(d.id, d.seq);
      call(opts.onUpdate, d, { transport: LEVELS[t.level] });
      if (FINAL[d.status]) {
        tokens.delete(d.id);
        if (!all) active.delete(d.id);
        call(opts.onDone, d);
        if (!all) changed();
      }
    }
    // The one gate every batch of log lines goes through (opts.logs): in order, never twice.
    function deliverLog(name, b) {
      if (!opts.logs || !b || typeof b.job !== "string" || (!all && !active.has(b.job))) return;
      var last = logSeqs.get(b.job) || 0;
      if (name === "log-gap") {
        if (b.last <= last) return;
        logSeqs.set(b.job, b.last);
        call(opts.onLogGap, { job: b.job, first: Math.max(b.first, last + 1), last: b.last });
        return;
      }
      var lines = (b.lines || []).filter(function (l) { return l.seq > last; });
      if (!lines.length) return;
      logSeqs.set(b.job, lines[lines.length - 1].seq);
      call(opts.onLog, { job: b.job, lines: lines });
    }
    function jobError(id, status, message) {
      active.delete(id);
      call(opts.onError, { job: id, status: status, message: message || (status === 410 ? "job expired" : "job not found") });
      changed();
    }

    // -- transports: each gets t and sets t.stop and t.update (false: restart me) --------------
    var OPEN = [
      function ws(t) {
        var u = new URL(base + "/ws" + q([], Array.from(active), t.ticket), root.location.href);
        u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
        var sock = new root.WebSocket(u.href), subscribed = new Set(), sentAll = false;
        function send(m) { if (sock.readyState === 1) sock.send(JSON.stringify(m)); }
        function sync() {
          if (sock.readyState !== 1) return true;
          if (all && !sentAll) { sentAll = true; send({ op: "subscribe", all: true }); }
          var add = [], since = {}, grant = {}, drop = [];
          active.forEach(function (id) { if (!subscribed.has(id)) add.push(id); });
          subscribed.forEach(function (id) { if (!active.has(id)) drop.push(id); });
          var logAfter = {};
          add.forEach(function (id) {
            subscribed.add(id);
            if (seqs.has(id)) since[id] = seqs.get(id);
            if (tokens.has(id)) grant[id] = tokens.get(id);
            if (logSeqs.has(id)) logAfter[id] = logSeqs.get(id);
          });
          drop.forEach(function (id) { subscribed.delete(id); });
          if (drop.length) send({ op: "unsubscribe", jobs: drop });
          var m = { op: "subscribe", jobs: add, since: since, tokens: grant };
          if (opts.logs) { m.logs = true; m.log_after = logAfter; }
          if (add.length) send(m);
          return true;
        }
        sock.onopen = function () { t.opened(); sync(); };
        sock.onmessage = function (e) {
          var m;
          try { m = JSON.parse(e.data); } catch (err) { return; }
          if (m.event === "error") {
            if (typeof m.job === "string") { subscribed.delete(m.job); jobError(m.job, m.status, m.message); }
            else if (m.status === 503) sock.close();
            else call(opts.onError, { job: null, status: m.status, message: m.message });
          } else if (m.event === "log" || m.event === "log-gap") {
            deliverLog(m.event, m.log);
          } else if (m.job) {
            if (FINAL[m.job.status]) subscribed.delete(m.job.id); // the server drops it too
            t.doc(m.job);
          }
        };
        sock.onclose = function () { t.lost(); };
        t.update = sync;
        t.stop = function () { sock.onopen = sock.onmessage = sock.onclose = null; sock.close(); };
      },

      function sse(t) {
        var ids = Array.from(active), sources = [];
        // A stream per job when each has its own token (a URL holds one credential) or logs are
        // wanted (only a job's own stream carries them); else /events.
        var perJob = !all && (ids.length === 1 || opts.logs || (!t.ticket && ids.some(function (id) { return tokens.has(id); })));
        function open(url, single) {
          var es = new root.EventSource(url);
          function on(e) {
            if (!single && e.lastEventId) cursor = e.lastEventId;
            var d;
            try { d = JSON.parse(e.data); } catch (err) { return; }
            if (single && FINAL[d.status]) es.close(); // the stream ends after this: not an error
            t.doc(d);
          }
          EVENTS.forEach(function (n) { es.addEventListener(n, on); });
          if (single && opts.logs) {
            ["log", "log-gap"].forEach(function (n) {
              es.addEventListener(n, function (e) { try { deliverLog(n, JSON.parse(e.data)); } catch (err) { /* not JSON */ } });
            });
          }
          es.onopen = function () { t.opened(); };
          // A browser retries some failures itself and gives up for good after others (a 502):
          // either way we close it and open a new one that resumes from our own seqs.
          es.onerror = function () { t.lost(); };
          sources.push(es);
        }
        t.update = function () { return all || Array.from(active).every(function (id) { return ids.indexOf(id) >= 0; }); };
        t.stop = function () { sources.forEach(function (es) { es.close(); }); };
        if (perJob && ids.length > 4) { setTimeout(function () { t.lost(); }); return; } // ~6 connections per host: poll
        if (perJob) {
          ids.forEach(function (id) {
            var p = seqs.has(id) ? ["since=" + seqs.get(id)] : [];
            if (opts.logs) p.push("logs=1", "log_after=" + (logSeqs.get(id) || 0));
            open(jobURL(id, "/events" + q(p, [id], t.ticket)), true);
          });
        } else {
          var p = ids.map(function (id) { return "job=" + encodeURIComponent(id); });
          if (cursor) p.push("cursor=" + encodeURIComponent(cursor));
          open(base + "/events" + q(p, ids, t.ticket), false);
        }
      },

      function longPoll(t) { poller(t, true); },
      function poll(t) { poller(t, false); }
    ];

    function poller(t, long) {
      var ctl = new AbortController(), loops = new Set();
      function pause(ms) {
        return new Promise(function (resolve) {
          var id = setTimeout(resolve, ms);
          ctl.signal.addEventListener("abort", function () { clearTimeout(id); resolve(); }, { once: true });
        });
      }
      function retryAfter(res) {
        var h = res.headers.get("retry-after"), s = Number(h);
        if (h && isNaN(s)) s = (Date.parse(h) - Date.now()) / 1000;
        return h ? Math.min(60000, Math.max(200, s * 1000)) : 0;
      }
      async function get(url) {
        var res = await fetch(url, { signal: ctl.signal, cache: "no-store", headers: { accept: "application/json" } });
        return { res: res, body: res.ok ? await res.json() : null };
      }
      async function job(id) {
        while (!t.stopped && active.has(id)) {
          var lp = long && active.size <= 4; // long polls hold a connection each: browsers allow ~6
          var started = Date.now(), r;
          try {
            r = await get(jobURL(id, q(lp ? ["wait=" + WAIT_S, "after=" + (seqs.get(id) || 0), "redirect=0"] : ["redirect=0"], [id])));
          } catch (e) { return t.lost(); }
          if (t.stopped) return;
          var st = r.res.status;
          if (st === 404 || st === 410 || st === 401 || st === 403) { jobError(id, st, st < 404 ? "not allowed to watch this job" : ""); return; }
          if (!r.res.ok) return t.lost(retryAfter(r.res));
          t.opened();
          t.healthy();
          if (opts.logs) { // the lines written so far, before the document (so before a final one)
            try {
              var lg = await get(jobURL(id, "/logs" + q(["after=" + (logSeqs.get(id) || 0)], [id])));
              if (lg.body) {
                var page = lg.body;
                if (page.dropped) deliverLog("log-gap", { job: id, first: (logSeqs.get(id) || 0) + 1, last: (logSeqs.get(id) || 0) + page.dropped });
                deliverLog("log", { job: id, lines: page.items });
              }
            } catch (e) { return t.lost(); }
            if (t.stopped) return;
          }
          var before = seqs.get(id);
          t.doc(r.body);
          if (!lp) await pause(retryAfter(r.res) || 1000);
          else if (seqs.get(id) === before && Date.now() - started < 1000) await pause(1000); // not holding: do not spin
        }
      }
      async function list() {
        while (!t.stopped) {
          var r;
          try { r = await get(base + "/jobs" + q(["limit=100"])); } catch (e) { return t.lost(); }
          if (t.stopped) return;
          if (r.res.status === 401 || r.res.status === 403) {
            call(opts.onError, { job: null, status: r.res.status, message: "not allowed to list jobs" });
            return t.lost(60000);
          }
          if (!r.res.ok) return t.lost(retryAfter(r.res));
          t.opened();
          t.healthy();
          (r.body.items || []).slice().reverse().forEach(t.doc);
          await pause(retryAfter(r.res) || 2000);
        }
      }
      function sync() {
        if (all) { if (!loops.size) { loops.add("*"); list(); } return true; }
        active.forEach(function (id) {
          if (loops.has(id)) return;
          loops.add(id);
          job(id).finally(function () { loops.delete(id); });
        });
        return true;
      }
      t.update = sync;
      t.stop = function () { ctl.abort(); };
      sync();
    }

    // -- choosing, falling back, upgrading ----------------------------------------------------
    function make(level, isProbe) {
      var t = { level: level, probe: isProbe, stopped: false, good: false, timer: null };
      t.doc = function (d) {
        if (t.stopped) return;
        if (t === current) report(LEVELS[level], true);
        t.healthy();
        deliver(d, t);
      };
      t.opened = function () {
        if (t.stopped) return;
        if (t === current) report(LEVELS[level], true);
        if (!t.timer) t.timer = setTimeout(t.healthy, HEALTHY_MS);
      };
      t.healthy = function () { if (!t.stopped && !t.good) { t.good = true; healthy(t); } };
      t.lost = function (hint) { if (!t.stopped) { halt(t); lost(t, hint); } };
      t.update = function () { return true; };
      t.stop = noop;
      function go(ticket) {
        if (t.stopped) return;
        t.ticket = ticket;
        try { OPEN[level](t); } catch (e) { setTimeout(function () { t.lost(); }); }
      }
      if (opts.ticket && level < 2) { // a fresh single-use ticket for each stream
        Promise.resolve().then(function () { return opts.ticket(all ? "all" : Array.from(active)); })
          .then(go, function () { t.lost(); });
      } else go(null);
      return t;
    }
    function halt(t) {
      if (!t) return;
      t.stopped = true;
      clearTimeout(t.timer);
      try { t.stop(); } catch (e) { /* already gone */ }
    }
    function connect() {
      clearTimeout(retryTimer);
      retryTimer = null;
      halt(current);
      current = null;
      if (closed) return;
      if (!wanted()) { halt(probe); probe = null; report("idle", false); return; }
      report(LEVELS[levels[li]], false);
      current = make(levels[li], false);
    }
    function healthy(t) {
      worked[t.level] = true;
      if (t === probe) { // a better transport works again: switch to it
        clearTimeout(retryTimer);
        retryTimer = null;
        halt(current);
        current = probe;
        probe = null;
        li = levels.indexOf(t.level);
        upgradeDelay = opts.upgradeAfter || 30000;
        report(LEVELS[t.level], true);
      }
      if (t === current) failures = 0;
      planUpgrade();
    }
    function lost(t, hint) {
      if (t === probe) { // try the next better one now; after the last, wait longer each round
        probe = null;
        var next = levels.indexOf(t.level) + 1;
        if (next < li && wanted()) { probe = make(levels[next], true); return; }
        upgradeDelay = Math.min(upgradeDelay * 2, 600000);
        planUpgrade();
        return;
      }
      if (t !== current) return;
      current = null;
      if (closed) return;
      report(LEVELS[t.level], false);
      if (t.good) failures = 0;
      else if (root.navigator && root.navigator.onLine === false) { retryTimer = setTimeout(connect, 30000); return; }
      else if (++failures >= (worked[t.level] ? 4 : 2) && li < levels.length - 1) {
        li++; // refused or failing: the next transport, at once
        failures = 0;
        connect();
        planUpgrade();
        return;
      }
      retryTimer = setTimeout(connect, Math.max(hint || 0, backoff(failures)));
    }
    function planUpgrade() {
      if (upgradeTimer || li === 0 || closed) return;
      upgradeTimer = setTimeout(function () {
        upgradeTimer = null;
        if (!closed && !probe && li > 0 && wanted()) probe = make(levels[0], true);
      }, upgradeDelay * (0.8 + Math.random() * 0.4));
    }
    function changed() {
      if (closed) return;
      if (!wanted()) { connect(); return; }
      if (probe && probe.update() === false) { halt(probe); probe = null; planUpgrade(); }
      if (!current) { if (!retryTimer) connect(); return; }
      if (current.update() === false) connect(); // a restart, not a failure
    }
    function kick() { // back online, awake again: reconnect now, resuming by seq
      if (closed || !wanted()) return;
      failures = 0;
      connect();
    }
    function offline() { // no network: stop trying until "online" (or 30 s, in case it never comes)
      if (closed || !wanted()) return;
      halt(current);
      halt(probe);
      current = probe = null;
      clearTimeout(retryTimer);
      retryTimer = setTimeout(connect, 30000);
      report("offline", false);
    }

    // -- sleep / wake, offline / online ---------------------------------------------------------
    function onVisibility() {
      if (doc.visibilityState === "hidden") { hiddenAt = Date.now(); return; }
      if (retryTimer || (hiddenAt && Date.now() - hiddenAt > 60000)) kick();
      lastTick = Date.now();
    }
    var ticker = setInterval(function () { // a frozen timer in a visible page means we slept
      var now = Date.now();
      if (now - lastTick > 20000 && (!doc || doc.visibilityState === "visible")) kick();
      lastTick = now;
    }, 5000);
    root.addEventListener("online", kick);
    root.addEventListener("offline", offline);
    if (doc) { doc.addEventListener("visibilitychange", onVisibility); doc.addEventListener("resume", kick); }

    var handle = {
      transport: "idle",
      live: false,
      /** Watch one more job (ids mode). since: the seq already rendered; token: its watch token. */
      add: function (id, since, token) {
        if (all || closed || active.has(id)) return handle;
        if (typeof since === "number") remember(id, since);
        if (token) tokens.set(id, token);
        active.add(id);
        changed();
        return handle;
      },
      remove: function (id) { if (active.delete(id)) changed(); return handle; },
      /** The last seq delivered for a job (undefined if none). */
      seq: function (id) { return seqs.get(id); },
      close: function () {
        if (closed) return;
        closed = true;
        halt(current);
        halt(probe);
        current = probe = null;
        clearTimeout(retryTimer);
        clearTimeout(upgradeTimer);
        clearInterval(ticker);
        root.removeEventListener("online", kick);
        root.removeEventListener("offline", offline);
        if (doc) { doc.removeEventListener("visibilitychange", onVisibility); doc.removeEventListener("resume", kick); }
        report("idle", false);
      },
    };
    var since = opts.since || {};
    Object.keys(since).forEach(function (id) { remember(id, since[id]); });
    if (!all) (ids || []).forEach(function (id) { active.add(id); });
    connect();
    return handle;
  }

  function watchJob(id, opts) { return watchJobs([id], opts); }

  root.ProgressClient = { watchJob: watchJob, watchJobs: watchJobs, transports: LEVELS.slice() };
})(typeof globalThis !== "undefined" ? globalThis : window);
