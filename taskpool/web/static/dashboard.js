// taskpool dashboard: live log, confirmed actions, auto-refresh. No dependency.
"use strict";
(function () {
  const base = document.body.dataset.base || "";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const dialog = document.getElementById("confirm");
  const REFRESH_MS = 5000;

  function post(path, body) {
    return fetch(base + path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
    }).then(async (response) => {
      const data = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(data.error || response.status + " " + response.statusText);
      return data;
    });
  }

  function toast(text) {
    const note = document.createElement("div");
    note.className = "toast";
    note.textContent = text;
    document.body.appendChild(note);
    setTimeout(() => note.remove(), 4000);
  }

  // -- the live log ---------------------------------------------------------
  const log = document.getElementById("log");
  if (log && log.dataset.stream) {
    const source = new EventSource(log.dataset.stream);
    // The stream always starts from the task's first byte: after a reconnect, start over.
    source.addEventListener("open", () => { log.innerHTML = ""; });
    source.addEventListener("chunk", (event) => {
      const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
      log.insertAdjacentHTML("beforeend", JSON.parse(event.data));
      if (atBottom) log.scrollTop = log.scrollHeight;
    });
    source.addEventListener("end", (event) => {
      source.close();
      const final = JSON.parse(event.data);
      document.getElementById("details").innerHTML = final.html;
      const heading = document.querySelector("h1 .badge");
      if (heading) heading.outerHTML = final.badge;
      const live = document.querySelector("[data-live]");
      if (live) { live.textContent = "ended"; live.classList.add("ended"); }
      const actions = document.querySelector(".actions[data-task]");
      if (actions) actions.innerHTML = final.actions;
      document.body.dataset.ended = final.status;
    });
    source.addEventListener("failure", (event) => {
      source.close();
      toast("log stream stopped: " + JSON.parse(event.data));
    });
  }

  // -- actions, each confirmed ----------------------------------------------
  const wording = {
    cancel: (id, label) => ["Cancel task " + id + "?", "Sends SIGTERM to " + label + ", then SIGKILL after its grace period."],
    force: (id, label) => ["Force cancel task " + id + "?", "Sends SIGKILL to " + label + " at once: it gets no chance to clean up."],
    retry: (id, label) => ["Retry task " + id + "?", "Queues " + label + " again, as a new task with the same command."],
    pause: (name) => ["Pause schedule " + name + "?", "It submits nothing until it is resumed; runs already submitted go on."],
    resume: (name) => ["Resume schedule " + name + "?", "It fires again from its next tick; the ticks it slept through are not run."],
  };

  function confirmAction(button) {
    const kind = button.dataset.action;
    if (kind === "pause" || kind === "resume") return confirmSchedule(button, kind);
    const id = button.closest("[data-task]").dataset.task;
    const force = button.dataset.force === "1";
    const taskKind = kind === "retry" ? "retry" : force ? "force" : "cancel";
    const go = ask(wording[taskKind](id, button.dataset.label));
    go.textContent = taskKind === "retry" ? "Retry" : taskKind === "force" ? "Force cancel" : "Cancel task";
    go.className = taskKind === "retry" ? "" : "danger";
    dialog.dataset.pending = JSON.stringify({ id, kind: taskKind });
    dialog.showModal();
  }

  function confirmSchedule(button, kind) {
    const name = button.closest("[data-schedule]").dataset.schedule;
    const go = ask(wording[kind](name));
    go.textContent = kind === "pause" ? "Pause schedule" : "Resume schedule";
    go.className = kind === "pause" ? "warn" : "";
    dialog.dataset.pending = JSON.stringify({ name, kind });
    dialog.showModal();
  }

  // Fills the dialog's title and text (as text, never markup); its confirm button.
  function ask([title, text]) {
    dialog.querySelector('[data-slot="title"]').textContent = title;
    dialog.querySelector('[data-slot="text"]').textContent = text;
    dialog.querySelector('[data-slot="error"]').textContent = "";
    return dialog.querySelector('[data-slot="go"]');
  }

  function actOnSchedule(name, kind) {
    const row = document.querySelector('tr[data-schedule="' + CSS.escape(name) + '"]');
    const buttons = row ? row.querySelectorAll("button") : [];
    buttons.forEach((b) => { b.disabled = true; });
    post("/api/schedules/" + encodeURIComponent(name) + "/" + kind, {}).then(async () => {
      toast("Schedule " + name + (kind === "pause" ? " paused" : " resumed"));
      await refresh();
      document.body.dataset.scheduleChanged = name + ":" + kind;
    }).catch((error) => {
      buttons.forEach((b) => { b.disabled = false; });
      toast("Refused: " + error.message);
    });
  }

  if (dialog) {
    dialog.addEventListener("close", () => {
      if (dialog.returnValue !== "go" || !dialog.dataset.pending) return;
      const pending = JSON.parse(dialog.dataset.pending);
      delete dialog.dataset.pending;
      if (pending.name !== undefined) { actOnSchedule(pending.name, pending.kind); return; }
      const { id, kind } = pending;
      const request = kind === "retry"
        ? post("/api/tasks/" + id + "/retry", {})
        : post("/api/tasks/" + id + "/cancel", { force: kind === "force" });
      document.querySelectorAll(".actions button").forEach((b) => { b.disabled = true; });
      request.then((data) => {
        if (kind === "retry") { window.location.href = base + "/tasks/" + data.id; return; }
        toast("Cancel requested for task " + id + " (" + (data.task.cancel_requested || data.task.status) + ")");
        document.body.dataset.cancelRequested = id;
      }).catch((error) => {
        document.querySelectorAll(".actions button").forEach((b) => { b.disabled = false; });
        toast("Refused: " + error.message);
      });
    });
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) { event.preventDefault(); confirmAction(button); return; }
    if (event.target.closest("button[data-logout]")) {
      post("/logout", {}).finally(() => { window.location.href = base + "/"; });
    }
  });

  // -- lists refresh themselves -----------------------------------------------
  const region = document.querySelector("[data-refresh]");

  async function refresh() {
    if (!region) return;
    try {
      const response = await fetch(window.location.href, { credentials: "same-origin" });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.querySelector("[data-refresh]");
      if (fresh) region.innerHTML = fresh.innerHTML;
    } catch (error) { /* the next tick tries again */ }
  }

  if (region) {
    const toggle = document.querySelector("[data-autorefresh]");
    setInterval(() => {
      if ((toggle && !toggle.checked) || (dialog && dialog.open) || document.hidden) return;
      refresh();
    }, REFRESH_MS);
  }
})();
