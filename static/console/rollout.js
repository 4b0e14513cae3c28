/* Rollout pages.
 *
 * Create form: add/remove stage rows, and as fields change ask the preview endpoint (GET, the
 * form's own fields) how many devices each stage reaches.
 * Rollout page: live stage progress from the rollout stream (OTAStream, static/console/stream.js):
 * a `snapshot` message carries rollout_metrics(); every later event refreshes the metrics from
 * the API (at most once a second), is added to the recent events, and rollout.* events update the
 * status and which controls show. Without the stream the page polls the metrics every 10 s.
 */
(function () {
  "use strict";

  // --- Create form ----------------------------------------------------------------------------

  function setupForm(form) {
    var rows = document.getElementById("stage-rows");
    var template = document.getElementById("stage-template");
    var total = form.querySelector('input[name="stages-TOTAL_FORMS"]');
    var maxForms = Number(form.querySelector('input[name="stages-MAX_NUM_FORMS"]').value || 20);
    var summary = form.querySelector("[data-preview-summary]");
    var problem = form.querySelector("[data-preview-error]");
    var timer = null;
    var pending = null;

    // Rows are renumbered after a removal so the formset's indexes stay 0..n-1.
    function renumber() {
      var list = rows.querySelectorAll(".stage-form-row");
      list.forEach(function (row, index) {
        row.querySelector(".stage-number").textContent = String(index + 1);
        row.querySelectorAll("input, select, textarea").forEach(function (input) {
          input.name = input.name.replace(/^stages-(\d+|__prefix__)-/, "stages-" + index + "-");
          if (input.id) input.id = input.id.replace(/^id_stages-(\d+|__prefix__)-/, "id_stages-" + index + "-");
        });
      });
      total.value = String(list.length);
    }

    document.getElementById("add-stage").addEventListener("click", function () {
      if (rows.querySelectorAll(".stage-form-row").length >= maxForms) return;
      rows.appendChild(template.content.cloneNode(true));
      renumber();
      schedule();
    });

    rows.addEventListener("click", function (event) {
      var button = event.target.closest("[data-remove-stage]");
      if (!button) return;
      button.closest(".stage-form-row").remove();
      renumber();
      schedule();
    });

    function query() {
      var data = new FormData(form);
      data.delete("csrfmiddlewaretoken");
      return new URLSearchParams(data).toString();
    }

    function render(body) {
      problem.hidden = true;
      var cells = rows.querySelectorAll("[data-preview-stage]");
      var filled = body.stages;
      var i = 0;
      rows.querySelectorAll(".stage-form-row").forEach(function (row, index) {
        var percent = row.querySelector('input[name$="-percentage"]').value;
        var cell = cells[index];
        if (!percent) { cell.textContent = "—"; return; }
        var stage = filled[i++];
        cell.textContent = stage ? stage.devices + " (" + stage.eligible + " to update)" : "—";
      });
      summary.textContent = body.targeted + " " + body.device_type + " device" +
        (body.targeted === 1 ? "" : "s") + " match the targeting; " + body.eligible +
        " run an older version and would be offered the firmware. The rollout is saved with " +
        "this draft's id, so each stage reaches exactly these devices (as the fleet stands now).";
    }

    function showProblem(body) {
      var text = body && body.detail ? body.detail : "The preview is not available.";
      if (body && body.errors) {
        text = Object.keys(body.errors).map(function (field) {
          return field + ": " + [].concat(body.errors[field]).join(" ");
        }).join(" · ");
      }
      problem.textContent = text;
      problem.hidden = false;
    }

    function refresh() {
      if (!form.elements.firmware.value) return;
      if (pending) pending.abort();
      pending = new AbortController();
      fetch(form.dataset.previewUrl + "?" + query(), {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
        signal: pending.signal
      }).then(function (response) {
        return response.json().then(function (body) {
          if (response.ok) render(body); else showProblem(body);
        });
      }).catch(function (error) {
        if (error.name !== "AbortError") showProblem(null);
      });
    }

    function schedule() {
      clearTimeout(timer);
      timer = setTimeout(refresh, 300);
    }

    form.addEventListener("input", schedule);
    form.addEventListener("change", schedule);
    refresh();
  }

  // --- Rollout page ---------------------------------------------------------------------------

  var OPEN = ["pending", "downloading", "installing", "validating"];

  function setupRollout(root) {
    var metricsUrl = root.dataset.metricsUrl;
    var success = Number(root.dataset.successThreshold);
    var rollback = Number(root.dataset.rollbackThreshold);
    var badge = root.querySelector("[data-rollout-status]");
    var reason = root.querySelector("[data-status-reason]");
    var live = root.querySelector("[data-live-status]");
    var events = root.querySelector("[data-events]");
    var lastFetch = 0;
    var fetchTimer = null;

    function pct(value) {
      return value === null || value === undefined ? "—" : (Math.round(value * 1000) / 10) + "%";
    }

    function setStatus(status, why) {
      if (!status) return;
      root.dataset.status = status;
      badge.textContent = status;
      badge.className = "badge badge-" + status;
      root.querySelectorAll("details[data-when]").forEach(function (control) {
        var allowed = control.dataset.when.split(" ").indexOf(status) >= 0;
        control.hidden = !allowed;
        if (!allowed) control.open = false;
      });
      if (why !== undefined) {
        reason.textContent = why || "";
        reason.hidden = !why;
      }
    }

    function renderMetrics(metrics) {
      if (!metrics || !metrics.stages) return;
      setStatus(metrics.status, metrics.status_reason);
      var targeted = root.querySelector("[data-targeted]");
      if (targeted && metrics.targeted_devices !== undefined) targeted.textContent = metrics.targeted_devices;
      metrics.stages.forEach(function (stage) {
        var row = root.querySelector('tr[data-stage="' + stage.position + '"]');
        if (!row) return;
        var sessions = stage.sessions || {};
        var open = OPEN.reduce(function (sum, s) { return sum + (sessions[s] || 0); }, 0);
        var ok = sessions.success || 0;
        var failed = sessions.failed || 0;
        var whole = Math.max(stage.devices || 0, ok + failed + open, 1);
        function set(field, text) {
          var cell = row.querySelector('[data-field="' + field + '"]');
          if (cell) cell.textContent = text;
        }
        function bar(name, n) {
          var el = row.querySelector('[data-bar="' + name + '"]');
          if (el) el.style.width = (100 * n / whole).toFixed(1) + "%";
        }
        set("state", stage.state);
        var stateBadge = row.querySelector('[data-field="state"]');
        if (stateBadge) stateBadge.className = "badge badge-" + stage.state;
        row.className = "stage-" + stage.state;
        set("devices", stage.devices);
        set("success", ok);
        set("open", open);
        set("failed", failed);
        set("success_rate", pct(stage.success_rate));
        set("failure_rate", pct(stage.failure_rate));
        bar("success", ok);
        bar("open", open);
        bar("failed", failed);
        var rateCell = row.querySelector('[data-field="success_rate"]');
        rateCell.classList.toggle("rate-warn", stage.success_rate !== null && stage.success_rate < success);
        var failCell = row.querySelector('[data-field="failure_rate"]');
        failCell.classList.toggle("rate-bad", stage.failure_rate !== null && stage.failure_rate > rollback);
      });
    }

    function fetchMetrics() {
      lastFetch = Date.now();
      fetchTimer = null;
      fetch(metricsUrl, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(renderMetrics)
        .catch(function () { /* the next event or poll tries again */ });
    }

    // At most one metrics request a second, however many devices report.
    function refreshSoon() {
      if (fetchTimer) return;
      var wait = Math.max(0, 1000 - (Date.now() - lastFetch));
      fetchTimer = setTimeout(fetchMetrics, wait);
    }

    // A short, linked device reference, as {% device_ref %} (ota_site/templatetags) renders it:
    // its hardware id when the event names it, else the first 8 hex digits of its id.
    function deviceRef(id, label) {
      var link = document.createElement("a");
      link.className = "mono device-ref";
      link.href = "/devices/" + encodeURIComponent(id) + "/";
      link.title = "device " + id;
      link.textContent = label || String(id).replace(/-/g, "").slice(0, 8);
      return link;
    }

    function addEvent(msg) {
      if (!events || !msg.id) return;
      if (events.querySelector('[data-event-id="' + msg.id + '"]')) return;
      var empty = events.querySelector("[data-events-empty]");
      if (empty) empty.remove();
      var item = document.createElement("li");
      item.className = "fresh";
      item.dataset.eventId = msg.id;
      var time = document.createElement("time");
      time.dateTime = msg.at || "";
      var at = msg.at ? new Date(msg.at) : null;
      if (at && !isNaN(at.getTime())) {
        // As the server renders them: 24-hour UTC (TIME_ZONE), the full date and time as a title.
        time.textContent = at.toISOString().slice(11, 19);
        time.title = at.toISOString().slice(0, 10) + " " + time.textContent + " UTC";
      }
      var kind = document.createElement("span");
      kind.className = "badge";
      kind.textContent = msg.type;
      var what = document.createElement("span");
      what.className = "what";
      what.appendChild(kind);
      var data = msg.data || {};
      what.appendChild(document.createTextNode(" "));
      if (msg.device_id) {
        what.appendChild(deviceRef(msg.device_id, data.hardware_id));
      } else if (msg.actor) {
        what.appendChild(document.createTextNode(msg.actor));
      }
      var text = (data.reason ? " — " + data.reason : "") +
        (data.status && msg.type.indexOf("session.") === 0 ? " " + data.status : "");
      if (text) what.appendChild(document.createTextNode(text));
      item.appendChild(time);
      item.appendChild(what);
      events.insertBefore(item, events.firstChild);
      while (events.children.length > 50) events.removeChild(events.lastChild);
    }

    function onMessage(msg) {
      if (!msg || !msg.type) return;
      if (msg.type === "snapshot") {
        renderMetrics(msg.stages ? msg : (msg.rollout || msg.metrics || msg.data));
        return;
      }
      addEvent(msg);
      if (msg.type.indexOf("rollout.") === 0 && msg.data && msg.data.status) {
        setStatus(msg.data.status, msg.data.reason);
      }
      refreshSoon();
    }

    var poller = null;
    function poll() {
      if (!poller) poller = setInterval(fetchMetrics, 10000);
    }

    if (window.OTAStream && typeof window.OTAStream.open === "function") {
      var show = window.OTAStream.indicator(live);
      window.OTAStream.open(root.dataset.streamPath, {
        onMessage: onMessage,
        onStatus: function (state, code) {
          show(state, code);
          // A stream that will not come back (signed out, refused): keep the page current anyway.
          if (state === "closed" || state === "unauthorized") poll();
        }
      });
    } else {
      poll();
    }
  }

  var form = document.getElementById("rollout-form");
  if (form) setupForm(form);
  var root = document.getElementById("rollout");
  if (root) setupRollout(root);
})();
