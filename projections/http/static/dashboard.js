// cairn dashboard: buttons that send commands to the JSON API, and a run page that follows
// the run's committed events (server-sent events) and re-reads its live part on each one.
"use strict";

(function () {
  const TERMINAL = ["completed", "failed", "cancelled"];
  const DONE = { approve: "approved", deny: "denied", cancel: "cancelled" };

  async function send(button) {
    const form = button.closest("form");
    const result = form && form.querySelector("[data-result]");
    const reason = form && form.querySelector("input[name=reason]");
    const action = button.dataset.action;
    const body = { reason: reason ? reason.value : "" };
    if (button.dataset.step) body.step = button.dataset.step;
    const buttons = form ? form.querySelectorAll("button") : [button];
    buttons.forEach((b) => { b.disabled = true; });
    if (result) { result.textContent = "sending…"; result.classList.remove("error"); }
    try {
      const response = await fetch(
        `/api/runs/${encodeURIComponent(button.dataset.run)}/${action}`,
        {
          method: "POST",
          credentials: "same-origin",
          headers: { "Content-Type": "application/json", Accept: "application/json" },
          body: JSON.stringify(body),
        },
      );
      const data = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
      if (result) result.textContent = `${DONE[action] || action} as ${data.by}`;
      const row = button.closest("tr");
      if (row) row.classList.add("decided");
    } catch (err) {
      if (result) { result.textContent = err.message; result.classList.add("error"); }
      buttons.forEach((b) => { b.disabled = false; });
    }
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) {
      event.preventDefault();
      send(button);
    }
  });

  const live = document.querySelector("[data-live-run]");
  if (!live) return;
  const run = live.dataset.liveRun;
  const state = document.getElementById("live-state");
  let position = 0;
  let busy = false;
  let again = false;
  let source = null;

  function typing() {
    const el = document.activeElement;
    return el && live.contains(el) && el.tagName === "INPUT" && el.value !== "";
  }

  async function refresh(seen) {
    position = Math.max(position, seen || 0);
    if (busy) { again = true; return; }
    if (typing()) { setTimeout(() => refresh(0), 500); return; } // keep a reason being typed
    busy = true;
    try {
      // `position` makes the server wait until the views include the event just announced.
      const response = await fetch(
        `/runs/${encodeURIComponent(run)}/live?position=${position}`,
        { credentials: "same-origin", headers: { Accept: "text/html" } },
      );
      if (response.ok) {
        live.innerHTML = await response.text();
        const head = live.querySelector("[data-status]");
        if (head && TERMINAL.includes(head.dataset.status) && source) {
          source.close();
          state.textContent = `live updates: done, the run is ${head.dataset.status}`;
        }
      } else {
        state.textContent = `live updates: could not re-read the run (HTTP ${response.status})`;
      }
    } catch (err) {
      state.textContent = `live updates: ${err.message}`;
    } finally {
      busy = false;
      if (again) { again = false; refresh(0); }
    }
  }

  const head = live.querySelector("[data-status]");
  if (head && TERMINAL.includes(head.dataset.status)) {
    state.textContent = `the run is ${head.dataset.status}`;
    return;
  }
  source = new EventSource(`/api/events?run=${encodeURIComponent(run)}`);
  // Events committed between rendering this page and subscribing are read here.
  source.onopen = () => { state.textContent = "live updates: on"; refresh(0); };
  source.onmessage = (event) => {
    const notice = JSON.parse(event.data);
    state.textContent = `live updates: on · last event ${notice.type} (#${notice.position})`;
    refresh(notice.position);
  };
  source.onerror = () => { state.textContent = "live updates: reconnecting…"; };
})();
