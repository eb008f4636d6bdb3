// The labelers' workbench: sign in with an API key, rank K responses (ties allowed) by drag
// and drop or keyboard, judge each response, optionally write a demonstration, submit.
// Plain DOM, no build step. Every text from the server is shown with textContent, never as
// HTML (the page's Content-Security-Policy would refuse inline script anyway).
"use strict";

const KEY_STORE = "rlhf-workbench-key";
const POLL_MS = 5000; // an empty queue is asked again this often
const MAIN_FLAGS = 4; // shown on the card; the others sit under "More flags"

const state = {
  key: sessionStorage.getItem(KEY_STORE),
  me: null,
  task: null,
  tiers: [], // tiers[i]: generation ids at rank i + 1 (more than one: a tie)
  judgements: new Map(), // generation id -> {quality, flags: Set}
  busy: false,
  poll: null, // the timer that asks an empty queue again
  drag: null, // {id, target}
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function localMidnight() {
  const day = new Date();
  day.setHours(0, 0, 0, 0);
  return day.getTime();
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { authorization: `Bearer ${state.key}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, `network error (${err.message}); nothing is lost, try again`);
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (data.error && data.error.message) || response.statusText;
    throw new ApiError(response.status, message);
  }
  return data;
}

// ------------------------------------------------------------------ sign in / out

async function signIn(key) {
  state.key = key;
  try {
    state.me = await api("GET", `/v1/workbench/me?since_ms=${localMidnight()}`);
  } catch (err) {
    state.key = null;
    sessionStorage.removeItem(KEY_STORE);
    const refused = err.status === 401 || err.status === 403;
    $("sign-in-error").textContent = refused ? `Key refused: ${err.message}` : err.message;
    showOnly("sign-in");
    $("api-key").focus();
    return;
  }
  sessionStorage.setItem(KEY_STORE, key);
  $("sign-in-error").textContent = "";
  $("api-key").value = "";
  $("stats").hidden = false;
  showStats();
  await nextTask();
}

function signOut() {
  sessionStorage.removeItem(KEY_STORE);
  Object.assign(state, { key: null, me: null, task: null, tiers: [] });
  $("stats").hidden = true;
  showOnly("sign-in");
  $("api-key").focus();
}

function showOnly(section) {
  for (const id of ["sign-in", "task", "empty"]) $(id).hidden = id !== section;
}

function showStats() {
  const me = state.me;
  $("who").textContent = me.labeler_id;
  $("today").textContent = String(me.today.tasks);
  const agreement = me.agreement;
  $("agreement").textContent =
    agreement.ratio === null
      ? "– (no shared prompts yet)"
      : `${(100 * agreement.ratio).toFixed(1)} % of ${agreement.compared} comparisons`;
  $("depth").textContent = String(me.queue_depth);
}

async function refreshStats() {
  try {
    state.me = await api("GET", `/v1/workbench/me?since_ms=${localMidnight()}`);
    showStats();
  } catch (err) {
    setStatus(err.message, true);
  }
}

// ------------------------------------------------------------------ tasks

async function nextTask(done = "") {
  let reply;
  try {
    reply = await api("POST", "/v1/workbench/tasks/next", {});
  } catch (err) {
    if (err.status === 401 || err.status === 403) return signOut();
    $("empty-note").textContent = err.message;
    showOnly("empty");
    return;
  }
  if (!reply.task) {
    state.task = null;
    $("empty-note").textContent = `${done} Nothing to label right now: ${reply.note}.`.trim();
    showOnly("empty");
    $("refresh").focus();
    pollLater();
    return;
  }
  loadTask(reply.task, done && `${done} Next task.`);
}

// While the queue is empty (and someone is signed in), ask again now and then.
function pollLater() {
  clearTimeout(state.poll);
  state.poll = setTimeout(() => {
    if (state.key && !$("empty").hidden && !state.busy) nextTask();
  }, POLL_MS);
}

function loadTask(task, note) {
  state.task = task;
  $("task").dataset.taskId = task.task_id;
  // A valid ranking from the start: each response in its own row, in the order shown.
  state.tiers = task.responses.map((r) => [r.generation_id]);
  state.judgements = new Map(
    task.responses.map((r) => [r.generation_id, { quality: 0, flags: new Set() }])
  );
  showPrompt(task);
  const versions = [...new Set(task.responses.map((r) => r.model_version))].join(", ");
  let meta = `Task ${task.task_id.slice(0, 8)} · ${task.k} responses · ${task.source} · ${versions}`;
  if (task.reward_gap !== null) meta += ` · reward-model gap ${task.reward_gap.toFixed(3)}`;
  $("task-meta").textContent = meta;
  $("demonstration").value = "";
  $("include-ranking").checked = true;
  setStatus(note || "");
  showOnly("task");
  render();
  const first = document.querySelector(".card");
  if (first) first.focus();
}

// A plain prompt as text; a chat conversation turn by turn, each with its role.
function showPrompt(task) {
  const prompt = $("prompt");
  if (!task.messages.length) {
    $("prompt-title").textContent = "Prompt";
    prompt.textContent = task.prompt;
    return;
  }
  $("prompt-title").textContent = "Conversation";
  prompt.replaceChildren(
    ...task.messages.map((m) =>
      el("div", { class: `turn ${m.role}` }, el("span", { class: "role", text: m.role }), el("span", { text: m.content }))
    )
  );
}

function responseOf(id) {
  return state.task.responses.find((r) => r.generation_id === id);
}

function letterOf(id) {
  return String.fromCharCode(65 + state.task.responses.findIndex((r) => r.generation_id === id));
}

// ------------------------------------------------------------------ the board

function render() {
  const board = $("board");
  board.replaceChildren();
  board.append(gap(0));
  state.tiers.forEach((tier, index) => {
    const row = el("li", { class: "tier", dataset: { rank: String(index + 1) } });
    const label = tier.length > 1 ? `Rank ${index + 1} (tie)` : `Rank ${index + 1}`;
    row.append(el("div", { class: "rank", text: label }));
    const cards = el("div", { class: "cards" });
    for (const id of tier) cards.append(card(id, index + 1, tier.length > 1));
    row.append(cards);
    board.append(row, gap(index + 1));
  });
}

function gap(position) {
  return el("li", { class: "gap", dataset: { position: String(position) }, "aria-hidden": "true" });
}

function card(id, rank, tied) {
  const response = responseOf(id);
  const judgement = state.judgements.get(id);
  const letter = letterOf(id);
  const node = el("div", {
    class: "card",
    tabindex: "0",
    role: "group",
    "aria-label": `Response ${letter}, rank ${rank}${tied ? " (tied)" : ""}`,
    dataset: { generationId: id },
  });
  const handle = el("span", { class: "handle", title: "Drag to rank", text: "⠿" });
  handle.addEventListener("pointerdown", (event) => startDrag(event, id));
  node.append(
    el("div", { class: "card-head" }, handle, el("strong", { text: `Response ${letter}` })),
    el("div", { class: "text", text: response.text })
  );

  const quality = el("select", { class: "quality", "aria-label": `Quality of response ${letter}` });
  quality.append(el("option", { value: "0", text: "–" }));
  for (let q = 1; q <= state.me.max_quality; q++) quality.append(el("option", { value: String(q), text: String(q) }));
  quality.value = String(judgement.quality);
  quality.addEventListener("change", () => (judgement.quality = Number(quality.value)));
  node.append(el("label", { class: "inline" }, "Quality (1–7) ", quality));

  const flags = el("div", { class: "flags" });
  const more = el("details", { class: "more-flags" }, el("summary", { text: "More flags" }));
  state.me.flags.forEach((flag, i) => {
    const box = el("input", { type: "checkbox", class: "flag", dataset: { flag: flag.name } });
    box.checked = judgement.flags.has(flag.name);
    box.addEventListener("change", () => {
      if (box.checked) judgement.flags.add(flag.name);
      else judgement.flags.delete(flag.name);
    });
    (i < MAIN_FLAGS ? flags : more).append(el("label", { class: "inline" }, box, ` ${flag.label}`));
  });
  if (state.me.flags.some((f, i) => i >= MAIN_FLAGS && judgement.flags.has(f.name))) more.open = true;
  flags.append(more);
  node.append(flags);
  node.addEventListener("keydown", (event) => onCardKey(event, id));
  return node;
}

function locate(id) {
  const index = state.tiers.findIndex((tier) => tier.includes(id));
  return { index, tier: state.tiers[index] };
}

// One step up or down: alone in a row -> tied with the next row -> alone beyond it -> ...
function step(id, direction) {
  const { index, tier } = locate(id);
  const tiers = state.tiers;
  if (tier.length > 1) {
    tier.splice(tier.indexOf(id), 1);
    tiers.splice(direction < 0 ? index : index + 1, 0, [id]);
    return true;
  }
  const neighbour = index + direction;
  if (neighbour < 0 || neighbour >= tiers.length) return false;
  tiers.splice(index, 1);
  tiers[direction < 0 ? neighbour : neighbour - 1].push(id);
  return true;
}

function onCardKey(event, id) {
  if (event.target !== event.currentTarget) return; // keys inside the card's own controls
  if (event.key !== "ArrowUp" && event.key !== "ArrowDown") return;
  event.preventDefault();
  if (step(id, event.key === "ArrowUp" ? -1 : 1)) {
    render();
    const { index, tier } = locate(id);
    const tie = tier.length > 1 ? " (tied)" : "";
    setStatus(`Response ${letterOf(id)} moved to rank ${index + 1}${tie}`);
  }
  document.querySelector(`.card[data-generation-id="${CSS.escape(id)}"]`).focus();
}

// Drag and drop with pointer events (mouse, pen and touch alike): drop on a row to tie with
// it, or on the gap between rows to rank alone there.
function startDrag(event, id) {
  event.preventDefault();
  state.drag = { id, target: null };
  document.body.classList.add("dragging");
  event.target.closest(".card").classList.add("lifted");
  const move = (e) => {
    const target = document.elementFromPoint(e.clientX, e.clientY);
    const zone = target && target.closest(".tier, .gap");
    for (const z of document.querySelectorAll(".drop-target")) z.classList.remove("drop-target");
    if (zone) zone.classList.add("drop-target");
    state.drag.target = zone;
  };
  const up = (e) => {
    move(e);
    document.removeEventListener("pointermove", move);
    document.removeEventListener("pointerup", up);
    document.body.classList.remove("dragging");
    drop(state.drag.id, state.drag.target);
    state.drag = null;
  };
  document.addEventListener("pointermove", move);
  document.addEventListener("pointerup", up);
}

function drop(id, zone) {
  if (zone) {
    const { index } = locate(id);
    const tiers = state.tiers;
    if (zone.classList.contains("tier")) {
      const target = Number(zone.dataset.rank) - 1;
      if (target !== index) {
        tiers[target].push(id);
        removeFrom(index, id);
      }
    } else {
      const position = Number(zone.dataset.position);
      tiers.splice(position, 0, [id]);
      removeFrom(position <= index ? index + 1 : index, id);
    }
  }
  render();
  const { index, tier } = locate(id);
  setStatus(`Response ${letterOf(id)} at rank ${index + 1}${tier.length > 1 ? " (tied)" : ""}`);
}

function removeFrom(index, id) {
  const tier = state.tiers[index];
  tier.splice(tier.indexOf(id), 1);
  if (tier.length === 0) state.tiers.splice(index, 1);
}

// ------------------------------------------------------------------ submit / skip

function submission() {
  const body = {};
  if ($("include-ranking").checked) {
    body.ranking = [];
    state.tiers.forEach((tier, index) => {
      for (const id of tier) {
        const judgement = state.judgements.get(id);
        body.ranking.push({
          generation_id: id,
          rank: index + 1,
          quality: judgement.quality,
          flags: [...judgement.flags],
        });
      }
    });
  }
  const text = $("demonstration").value;
  if (text.trim()) body.demonstration = text;
  return body;
}

async function submit() {
  if (state.busy || !state.task) return; // a double click sends once (and the key dedupes)
  const body = submission();
  if (!body.ranking && !body.demonstration) {
    setStatus("Rank the responses, write a demonstration, or both.", true);
    return;
  }
  setBusy(true);
  setStatus("Submitting…");
  try {
    const task = state.task.task_id;
    const reply = await api("POST", `/v1/workbench/tasks/${task}/submit?since_ms=${localMidnight()}`, body);
    const stored = [reply.comparison, reply.demonstration].filter(Boolean);
    const duplicate = stored.every((ack) => ack.duplicate);
    const ids = stored.map((ack) => ack.event_id.slice(0, 8)).join(", ");
    const done = duplicate ? "Already stored earlier." : `Stored (${ids}).`;
    await refreshStats();
    await nextTask(done);
  } catch (err) {
    if (err.status === 401 || err.status === 403) return signOut();
    setStatus(`Not stored: ${err.message}`, true);
  } finally {
    setBusy(false);
  }
}

async function skip() {
  if (state.busy || !state.task) return;
  setBusy(true);
  try {
    await api("POST", `/v1/workbench/tasks/${state.task.task_id}/skip`, {});
    await nextTask();
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("submit").disabled = busy;
  $("skip").disabled = busy;
}

function setStatus(text, error = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", error);
}

// ------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) signIn(key);
  });
  $("sign-out").addEventListener("click", signOut);
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("refresh").addEventListener("click", () => nextTask());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("task").hidden) {
      event.preventDefault();
      submit();
    }
  });
  if (state.key) signIn(state.key);
  else showOnly("sign-in");
});
