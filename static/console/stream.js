/* OTAStream: the console's client for the live streams (docs/console.md "Live streams").
 *
 *   var stream = OTAStream.open("/api/v1/stream/rollouts/" + id, {
 *     onMessage: function (msg) { ... },          // {"type": "snapshot" | "fleet.update" | <event kind>, ...}
 *     onStatus: OTAStream.indicator(element)      // or function (state, closeCode) { ... }
 *   });
 *   stream.close();
 *
 * The URL is built from <body data-stream-base> (empty: this origin, ws: or wss: as the page).
 * The session cookie authenticates; the server sends a snapshot first, then events. When the
 * connection drops it reconnects with backoff and resumes with ?after=<last id seen>, so no event
 * is lost or repeated (and no second snapshot comes: the page keeps its state).
 * States: "connecting", "live", "reconnecting", and the final "unauthorized" (4401: signed out),
 * "closed" (4403/4404/4400, or close()).
 */
(function () {
  "use strict";

  var FINAL = { 4400: "closed", 4401: "unauthorized", 4403: "closed", 4404: "closed" };
  var LABELS = {
    connecting: "connecting…",
    live: "live",
    reconnecting: "reconnecting…",
    unauthorized: "signed out: reload the page",
    closed: "not live",
  };

  function base() {
    var configured = (document.body && document.body.dataset.streamBase) || "";
    if (configured) return configured.replace(/\/+$/, "");
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host;
  }

  function open(path, options) {
    options = options || {};
    var socket = null;
    var timer = null;
    var attempt = 0;
    var stopped = false;
    var handle = { state: null, lastId: null, close: close };

    function status(state, code) {
      if (state === handle.state) return;
      handle.state = state;
      if (options.onStatus) options.onStatus(state, code);
    }

    function url() {
      if (handle.lastId === null) return base() + path;
      return base() + path + (path.indexOf("?") < 0 ? "?" : "&") + "after=" + handle.lastId;
    }

    function connect() {
      timer = null;
      status(attempt ? "reconnecting" : "connecting");
      try {
        socket = new WebSocket(url());
      } catch (err) {
        retry();
        return;
      }
      socket.onopen = function () {
        attempt = 0;
        status("live");
      };
      socket.onmessage = function (event) {
        var msg;
        try {
          msg = JSON.parse(event.data);
        } catch (err) {
          return;
        }
        if (typeof msg.id === "number") {
          // Ids only grow; an older one would be a repeat.
          if (msg.type !== "snapshot" && handle.lastId !== null && msg.id <= handle.lastId) return;
          handle.lastId = msg.id;
        }
        if (options.onMessage) options.onMessage(msg);
      };
      socket.onclose = function (event) {
        socket = null;
        if (stopped) return;
        if (FINAL[event.code]) {
          stopped = true;
          status(FINAL[event.code], event.code);
          return;
        }
        retry();
      };
    }

    function retry() {
      attempt += 1;
      status("reconnecting");
      // 0.5 s, 1 s, 2 s ... up to 30 s, with jitter so a restarted server is not hit at once.
      var delay = Math.min(30000, 500 * Math.pow(2, attempt - 1));
      timer = setTimeout(connect, delay * (0.5 + Math.random() / 2));
    }

    function close() {
      stopped = true;
      if (timer) clearTimeout(timer);
      if (socket) socket.close(1000);
      status("closed");
    }

    connect();
    return handle;
  }

  /* An onStatus that shows the state in `element` (text, and data-state for styling). */
  function indicator(element) {
    return function (state) {
      if (!element) return;
      element.dataset.state = state;
      element.textContent = LABELS[state] || state;
    };
  }

  window.OTAStream = { open: open, indicator: indicator, base: base };
})();
