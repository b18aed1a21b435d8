// gatewayd's site dashboard: the live parts of its pages.
//
// A WebSocket to the live hub (the session cookie is the credential), a list of what
// arrives (#tail), and the page's server-drawn part (the element with data-refresh)
// drawn again by the server when something arrives, at most once a second, and every
// 15 s for what the hub does not carry (a device going offline, the outbox draining).
// No HTML is built here from what a device sent: the list uses textContent, and the
// redrawn part comes from the server, escaped there. A part with a form field in use is
// left as it is until the field is left.
"use strict";
(function () {
  const streams = document.body.dataset.streams;
  if (!streams) return;
  const liveState = document.getElementById("live-state");
  const tail = document.getElementById("tail");
  const parts = Array.from(document.querySelectorAll("[data-refresh]"));
  const login = "/dashboard/login?next=" + encodeURIComponent(location.pathname + location.search);
  let timer = null;
  let drawing = false;
  let socket = null;
  let retry = 1000;

  function status(state, text) {
    if (liveState) {
      liveState.dataset.state = state;
      liveState.textContent = text;
    }
  }

  async function redraw() {
    timer = null;
    if (drawing) return schedule(500);
    drawing = true;
    try {
      for (const part of parts) {
        // Someone is filling in a form of this part (a plugin's panel): it is not drawn
        // again under their fingers; the next redraw after they leave it will do.
        if (editing(part)) {
          schedule(1000);
          continue;
        }
        const answer = await fetch(part.dataset.refresh, {
          credentials: "same-origin", cache: "no-store", headers: {"X-Dashboard-Part": "1"}});
        if (answer.status === 401) return location.assign(login);
        if (!answer.ok) continue;
        const html = await answer.text();
        // The live list is the page's own: it moves into the redrawn part as it is.
        const kept = tail && part.contains(tail) ? tail : null;
        part.innerHTML = html;
        const slot = kept && part.querySelector("#tail");
        if (slot) slot.replaceWith(kept);
      }
    } catch (e) {
      // The gateway restarts or the network is down: the next redraw will do.
    } finally {
      drawing = false;
    }
  }

  function editing(part) {
    const active = document.activeElement;
    return Boolean(active && active !== document.body && active.form && part.contains(active));
  }

  // However busy the site, at most one redraw a second: events meanwhile wait for it.
  function schedule(delay) {
    if (timer === null) timer = setTimeout(redraw, delay);
  }

  function line(...children) {
    const empty = tail.querySelector(".empty");
    if (empty) empty.remove();
    const item = document.createElement("li");
    item.append(...children);
    tail.prepend(item);
    const max = Number(tail.dataset.max || 20);
    while (tail.children.length > max) tail.lastElementChild.remove();
    return item;
  }

  function text(tag, className, content) {
    const node = document.createElement(tag);
    node.className = className;
    node.textContent = content;
    return node;
  }

  function show(event) {
    if (!tail) return;
    const when = new Date(event.ts * 1000).toLocaleTimeString();
    const item = line(text("time", "when", when), " ", text("span", "stream", event.stream), " ",
                      text("code", "data", JSON.stringify(event.data)));
    item.dataset.stream = event.stream;
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(scheme + "//" + location.host + "/api/gateway/live?streams=" + encodeURIComponent(streams));
    socket.onopen = function () {
      retry = 1000;
      status("open", "live");
    };
    socket.onmessage = function (message) {
      let doc;
      try {
        doc = JSON.parse(message.data);
      } catch (e) {
        return;
      }
      if (!Array.isArray(doc)) return; // a heartbeat or an answer
      for (const event of doc) {
        if ("gap" in event) {
          if (tail) line(text("span", "gap", event.gap + " events skipped: this page read too slowly"));
        } else {
          show(event);
        }
      }
      schedule(1000);
    };
    socket.onclose = function (closing) {
      socket = null;
      if (closing.code === 4401) return location.assign(login); // the session ended
      status("closed", "live: reconnecting…");
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 30000);
    };
  }

  // A page left behind frees its place at once (5 live connections per session).
  window.addEventListener("pagehide", function () {
    if (socket) socket.close(1000);
  });
  connect();
  setInterval(function () { schedule(0); }, 15000);
})();
