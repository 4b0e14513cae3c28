/* Small helpers for every console page; no dependencies (Chart.js only where a page has charts).

   Console.live(streamPath)    (started by an element with data-live-stream="<path>") keep a page current: when the stream (static/console/stream.js,
                               OTAStream) reports anything, re-read this page from the server and
                               swap every element with a data-live="name" attribute for its new
                               version (at most once a second). Without OTAStream, or while the
                               stream is down, the page re-reads itself every 15 s instead.
                               An element [data-stream-status] shows the stream's state.
   Console.charts()            draw every <canvas data-chart="name" data-kind="bar|doughnut">
                               from the JSON of <script id="chart-data"> ({name: {labels, counts}});
                               re-run after a live refresh to update them in place.
   Fires "console:refreshed" on document after each live refresh.
*/
(function () {
  "use strict";

  var REFRESH_MIN_MS = 1000;
  var POLL_MS = 15000;
  var charts = {};
  var palette = ["#2457c5", "#1f8a4c", "#a86200", "#c0362c", "#7a4cc2", "#0f8a8a", "#c2487a",
                 "#5f6b7a", "#8aa624", "#3b8fd9", "#aab3bf"];
  var statusColors = { idle: "#aab3bf", updating: "#2457c5", failed: "#c0362c", success: "#1f8a4c",
                       Idle: "#aab3bf", Updating: "#2457c5", Failed: "#c0362c", Success: "#1f8a4c",
                       Online: "#1f8a4c", Offline: "#aab3bf" };

  function chartData() {
    var node = document.getElementById("chart-data");
    if (!node) { return null; }
    try { return JSON.parse(node.textContent); } catch (e) { return null; }
  }

  function colorsFor(labels, kind) {
    return labels.map(function (label, i) {
      return (kind === "doughnut" && statusColors[label]) || palette[i % palette.length];
    });
  }

  function drawCharts() {
    var data = chartData();
    if (!data || typeof window.Chart === "undefined") { return; }
    document.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      var name = canvas.getAttribute("data-chart");
      var kind = canvas.getAttribute("data-kind") || "bar";
      var series = data[name];
      if (!series) { return; }
      var existing = charts[name];
      if (existing && existing.canvas === canvas) {
        existing.data.labels = series.labels;
        existing.data.datasets[0].data = series.counts;
        existing.data.datasets[0].backgroundColor = colorsFor(series.labels, kind);
        existing.update();
        return;
      }
      if (existing) { existing.destroy(); }
      charts[name] = new window.Chart(canvas, {
        type: kind,
        data: {
          labels: series.labels,
          datasets: [{ label: canvas.getAttribute("aria-label") || name, data: series.counts,
                       backgroundColor: colorsFor(series.labels, kind), borderWidth: 0 }]
        },
        options: {
          responsive: true, maintainAspectRatio: false, animation: { duration: 300 },
          indexAxis: kind === "bar" ? "y" : undefined,
          plugins: { legend: { display: kind !== "bar", position: "bottom" } },
          scales: kind === "bar" ? { x: { beginAtZero: true, ticks: { precision: 0 } } } : undefined
        }
      });
    });
  }

  var pending = null;
  var lastRefresh = 0;
  var inFlight = false;

  function refresh() {
    if (inFlight) { schedule(); return; }
    inFlight = true;
    lastRefresh = Date.now();
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live]").forEach(function (node) {
          var name = node.getAttribute("data-live");
          var fresh = doc.querySelector('[data-live="' + name + '"]');
          // An open confirmation or a focused field is left alone: never yank a control away.
          if (!fresh || node.querySelector("details[open], :focus")) { return; }
          node.replaceWith(fresh);
        });
        var freshData = doc.getElementById("chart-data");
        var oldData = document.getElementById("chart-data");
        if (freshData && oldData) { oldData.textContent = freshData.textContent; }
        drawCharts();
        document.dispatchEvent(new CustomEvent("console:refreshed"));
      })
      .catch(function () { /* the next message or poll tries again */ })
      .then(function () { inFlight = false; });
  }

  function schedule() {
    if (pending) { return; }
    var wait = Math.max(0, lastRefresh + REFRESH_MIN_MS - Date.now());
    pending = window.setTimeout(function () { pending = null; refresh(); }, wait);
  }

  var LABELS = { live: "Live", connecting: "Connecting…", reconnecting: "Reconnecting…",
                 unauthorized: "Signed out: reload the page", closed: "Updates every 15 s" };

  function setStatus(state) {
    document.querySelectorAll("[data-stream-status]").forEach(function (node) {
      node.setAttribute("data-state", state);
      node.textContent = LABELS[state] || state;
    });
  }

  function live(streamPath) {
    var streamLive = false;
    // While the stream is not live (not there, reconnecting, refused), poll instead.
    window.setInterval(function () { if (!streamLive) { refresh(); } }, POLL_MS);
    if (typeof window.OTAStream === "undefined" || !streamPath) {
      setStatus("closed");
      return;
    }
    window.OTAStream.open(streamPath, {
      onMessage: function () { schedule(); },
      onStatus: function (state) {
        streamLive = state === "live";
        setStatus(state);
      }
    });
  }

  window.Console = { live: live, charts: drawCharts, refresh: refresh };
  document.addEventListener("DOMContentLoaded", function () {
    drawCharts();
    // A page asks for live updates with <… data-live-stream="/api/v1/stream/…"> (no inline script).
    var stream = document.querySelector("[data-live-stream]");
    if (stream) { live(stream.getAttribute("data-live-stream")); }
  });
})();
