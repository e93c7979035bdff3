// Shared by the demo page and the dashboard: how a job document reads to a person.
(function (root) {
  "use strict";
  var TRANSPORTS = {
    websocket: "WebSocket",
    sse: "Server-Sent Events",
    "long-poll": "long polling",
    poll: "polling",
    idle: "idle",
    offline: "offline",
  };

  function percent(p) {
    return p == null ? "–" : (Math.round(p * 10) / 10) + "%";
  }

  function seconds(s) {
    if (s == null || !isFinite(s)) return "";
    if (s < 1) return "under 1 s";
    if (s < 60) return Math.round(s) + " s";
    var m = Math.floor(s / 60), r = Math.round(s % 60);
    if (m < 60) return m + " min " + (r < 10 ? "0" : "") + r + " s";
    return Math.floor(m / 60) + " h " + (m % 60) + " min";
  }

  function duration(job) {
    var a = Date.parse(job.started_at || job.created_at), b = Date.parse(job.finished_at);
    return isNaN(a) || isNaN(b) ? null : Math.max(0, (b - a) / 1000);
  }

  /** "WebSocket", "Server-Sent Events (reconnecting…)", ...; was: it has been live before. */
  function transport(name, live, was) {
    var label = TRANSPORTS[name] || name;
    if (name === "idle") return "idle (no job watched)";
    if (name === "offline") return "offline (waiting for the network)";
    return live ? label : label + (was ? " (reconnecting…)" : " (connecting…)");
  }

  function time(iso) {
    var d = new Date(iso);
    return isNaN(d) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  /** Set a <progress>: indeterminate while progress is unknown. */
  function bar(el, job) {
    if (job.progress == null && job.status !== "succeeded") el.removeAttribute("value");
    else el.value = job.status === "succeeded" ? 100 : job.progress;
  }

  root.ProgressFormat = { percent: percent, seconds: seconds, duration: duration, transport: transport, time: time, bar: bar };
})(typeof globalThis !== "undefined" ? globalThis : window);
