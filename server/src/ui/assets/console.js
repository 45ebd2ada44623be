// The console's live updates. Every page works without this script; with it, the parts of a
// page marked data-live follow the watch API: on a change the page is fetched again and those
// parts are swapped in place, and the logs of an instance stream in.
"use strict";
(function () {
  var state = document.getElementById("live-state");
  function say(text) { if (state) { state.textContent = text; } }

  // What names a control, so that it is found again in a new version of its part: its id,
  // else its kind, target, form and label.
  function identity(e) {
    if (e.id) { return "#" + e.id; }
    var form = e.form || e.closest("form");
    return [e.tagName, e.getAttribute("href"), form ? form.getAttribute("action") : "",
      e.getAttribute("aria-label"), e.getAttribute("name"), e.textContent.trim()].join("\u0000");
  }
  function sameIn(root, e) {
    var want = identity(e);
    var all = root.querySelectorAll(e.tagName);
    for (var i = 0; i < all.length; i++) { if (identity(all[i]) === want) { return all[i]; } }
    return null;
  }

  // Re-fetches the page and swaps each data-live element for its new version.
  var busy = false, again = false, timer = null;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    // A redirect (the session ended: it would lead to the login page) is not followed here;
    // the page is loaded again instead, and the server says where to go.
    fetch(location.href, { credentials: "same-origin", redirect: "manual", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (r.type === "opaqueredirect" || r.status === 401) { location.reload(); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (!html) { return; }
        var doc = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live]").forEach(function (el) {
          var fresh = doc.getElementById(el.id);
          if (fresh) {
            // Keep focus where it was when the focused element survives the swap.
            var active = document.activeElement;
            var focused = active && el.contains(active) ? sameIn(fresh, active) : null;
            el.replaceWith(fresh);
            if (focused) { focused.focus(); }
          }
        });
        say("Updated " + new Date().toLocaleTimeString());
      })
      .catch(function () { say("Live updates paused: the server did not answer"); })
      .finally(function () {
        busy = false;
        if (again) { again = false; schedule(); }
      });
  }
  function schedule() {
    if (timer) { return; }
    timer = setTimeout(function () { timer = null; refresh(); }, 100);
  }

  // One watch per page: the first data-live element that names one.
  var source = document.querySelector("[data-live][data-watch]");
  if (source && window.EventSource) {
    var url = source.getAttribute("data-watch");
    var index = source.getAttribute("data-index") || "0";
    var only = source.getAttribute("data-watch-name");
    var open = function (from) {
      var sep = url.indexOf("?") >= 0 ? "&" : "?";
      var es = new EventSource(url + sep + "watch=true&resourceVersion=" + from);
      es.onopen = function () { say("Live"); };
      es.onmessage = function (m) {
        var ev;
        try { ev = JSON.parse(m.data); } catch (e) { return; }
        if (ev.type === "BOOKMARK") { return; }
        if (ev.type === "ERROR") { es.close(); location.reload(); return; }
        var name = ev.object && ev.object.metadata && ev.object.metadata.name;
        if (only && name !== only) { return; }
        schedule();
      };
      es.onerror = function () { say("Reconnecting…"); };
    };
    open(index);
  }

  // Parts that change without a write to the store (the charts of what replicas use) are
  // fetched again on their own period, in seconds.
  var periodic = document.querySelector("[data-live][data-refresh]");
  if (periodic) {
    var every = parseInt(periodic.getAttribute("data-refresh"), 10);
    if (every > 0) { setInterval(schedule, every * 1000); }
  }

  // Live logs: a streaming fetch of the logs endpoint, the newest lines kept.
  var logs = document.getElementById("logs");
  if (logs && window.fetch && window.TextDecoder) {
    var MAX = 2000;
    var lines = [];
    fetch(logs.getAttribute("data-logs"), { credentials: "same-origin", redirect: "manual" }).then(function (r) {
      if (r.type === "opaqueredirect") { location.reload(); return null; }
      if (!r.ok || !r.body) {
        return r.text().then(function (t) { logs.textContent = "Logs unavailable (" + r.status + ")"; });
      }
      var reader = r.body.getReader();
      var decoder = new TextDecoder();
      var rest = "";
      var pump = function () {
        return reader.read().then(function (chunk) {
          if (chunk.done) { return; }
          var text = rest + decoder.decode(chunk.value, { stream: true });
          var parts = text.split("\n");
          rest = parts.pop();
          lines = lines.concat(parts);
          if (lines.length > MAX) { lines = lines.slice(lines.length - MAX); }
          var atEnd = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
          logs.textContent = lines.join("\n");
          if (atEnd) { logs.scrollTop = logs.scrollHeight; }
          return pump();
        });
      };
      return pump();
    }).catch(function () { logs.textContent += "\n(the log stream ended)"; });
  }
})();
