// The example chat page's script (examples/web/index.html): a file of its own, so the
// page's Content-Security-Policy allows scripts from the app's origin only, none inline.
"use strict";
// Everything the page shows is a pure function of the events it received, so a reload
// restores the same view from the events kept in sessionStorage, then resumes the stream
// after the last seq it has (?last_event_id=; EventSource itself sends Last-Event-ID
// when it reconnects on its own).
const $ = (id) => document.getElementById(id);
const page = { receivedSeqs: [], resumedAfter: null, duplicates: 0 };
window.relieverPage = page;

let job = null;        // {id, events: [], lastSeq, attemptN, done}
let source = null;
let saveTimer = null;

function storageKey(id) { return "reliever.job." + id; }
function save() {
  clearTimeout(saveTimer);
  saveTimer = null;
  if (job) sessionStorage.setItem(storageKey(job.id), JSON.stringify(job.events));
}
function saveSoon() { if (saveTimer === null) saveTimer = setTimeout(save, 250); }
window.addEventListener("pagehide", save);

function setStatus(kind, text) {
  const el = $("status");
  el.dataset.kind = kind;
  el.textContent = text;
  document.body.dataset.state = kind;
  $("answer").classList.toggle("streaming", kind === "streaming");
  const running = kind === "streaming" || kind === "waiting" || kind === "reconnecting";
  $("cancel").disabled = !running;
  $("send").disabled = running;
}
function pill(id, text) { const el = $(id); el.textContent = text; el.hidden = !text; }

function note(type, seq, text, extraClass) {
  const li = document.createElement("li");
  li.dataset.type = type;
  if (seq) li.dataset.seq = seq;
  if (extraClass) li.className = extraClass;
  const s = document.createElement("span");
  s.className = "seq";
  s.textContent = seq ? "#" + seq : "";
  li.append(s, document.createTextNode(text));
  $("timeline").append(li);
}

function errorText(error) {
  if (!error) return "";
  const status = error.status ? " " + error.status : "";
  return error.kind + status + (error.message ? ": " + error.message : "");
}

function attemptSpan(n) {
  let span = $("answer").querySelector('span.attempt[data-n="' + n + '"]');
  if (!span) {
    span = document.createElement("span");
    span.className = "attempt";
    span.dataset.n = n;
    $("answer").append(span);
  }
  return span;
}

function discardAttempt(n) {
  const span = $("answer").querySelector('span.attempt[data-n="' + n + '"]');
  if (!span) return 0;
  const dropped = span.textContent.length;
  span.remove();
  return dropped;
}

function apply(ev) {
  switch (ev.type) {
    case "started": {
      const pinned = ev.in_cooldown ? " (cooldown: starts at " + ev.start_model + ")" : "";
      note("started", ev.seq, "started · agent " + ev.agent + " · chain " + ev.chain.join(" → ") + pinned);
      pill("model", ev.start_model);
      setStatus("streaming", "streaming");
      break;
    }
    case "attempt":
      job.attemptN = ev.n;
      attemptSpan(ev.n);
      pill("model", ev.model);
      pill("attempt", "attempt " + ev.attempt + "/" + ev.max_attempts + (ev.fallback ? " · fallback" : ""));
      note("attempt", ev.seq, "attempt " + ev.attempt + "/" + ev.max_attempts + " on " + ev.model);
      setStatus("streaming", "streaming");
      break;
    case "delta":
      if (ev.text) attemptSpan(ev.n).append(ev.text);
      if (ev.tool_call) {
        const t = document.createElement("span");
        t.className = "tool";
        t.textContent = "[tool " + (ev.tool_call.name || "") + " " + (ev.tool_call.arguments || "") + "]";
        attemptSpan(ev.n).append(t);
      }
      break;
    case "retry": {
      const dropped = ev.discard ? discardAttempt(ev.n) : 0;
      note("retry", ev.seq, "retry " + ev.model + " in " + ev.delay_s.toFixed(2) + " s after " +
           errorText(ev.error) + (ev.discard ? " · discarded " + dropped + " characters" : ""));
      break;
    }
    case "fallback": {
      const dropped = ev.discard ? discardAttempt(job.attemptN) : 0;
      note("fallback", ev.seq, "fallback " + ev.from + " → " + ev.to + " after " + errorText(ev.error) +
           (ev.discard ? " · discarded " + dropped + " characters" : ""));
      break;
    }
    case "restarted":
      $("answer").replaceChildren();
      note("restarted", ev.seq, "restarted on another worker · discarded the partial answer");
      break;
    case "completed": {
      job.done = true;
      if ($("answer").textContent !== ev.text) {
        $("answer").replaceChildren(ev.text);
        note("note", null, "streamed text differed from the final text: replaced", "note corrected");
      }
      pill("model", "answered by " + ev.model);
      pill("attempt", ev.attempts.length + (ev.attempts.length === 1 ? " attempt" : " attempts") +
           (ev.fallback_used ? " · fallback used" : ""));
      note("completed", ev.seq, "completed by " + ev.model + " in " + ev.duration_s.toFixed(2) + " s");
      setStatus("completed", "completed");
      break;
    }
    case "failed": {
      job.done = true;
      const cancelled = ev.error && ev.error.kind === "cancelled";
      note("failed", ev.seq, "failed · " + errorText(ev.error));
      setStatus(cancelled ? "cancelled" : "failed", cancelled ? "cancelled" : "failed: " + ev.error.kind);
      break;
    }
  }
}

function receive(ev) {
  page.receivedSeqs.push(ev.seq);
  if (ev.seq <= job.lastSeq) { page.duplicates += 1; return; }
  job.lastSeq = ev.seq;
  job.events.push(ev);
  apply(ev);
  if (ev.type === "delta") saveSoon(); else save();
  if (job.done) { source.close(); source = null; }
}

function follow() {
  const url = "/chat/" + encodeURIComponent(job.id) + "/events" +
              (job.lastSeq ? "?last_event_id=" + job.lastSeq : "");
  source = new EventSource(url);
  source.onmessage = (message) => receive(JSON.parse(message.data));
  source.onopen = () => { if (!job.done && !job.events.length) setStatus("waiting", "waiting for a worker"); };
  source.onerror = () => {
    if (!source || job.done) return;
    if (source.readyState === EventSource.CLOSED) setStatus("failed", "stream closed");
    else setStatus("reconnecting", "reconnecting…");
  };
}

function openJob(id, events) {
  if (source) { source.close(); source = null; }
  job = { id: id, events: [], lastSeq: 0, attemptN: 0, done: false };
  $("answer").replaceChildren();
  $("timeline").replaceChildren();
  pill("model", ""); pill("attempt", "");
  $("job").textContent = "job " + id;
  setStatus("waiting", "waiting for a worker");
  for (const ev of events) { job.lastSeq = ev.seq; job.events.push(ev); apply(ev); }
  if (events.length && !job.done) {
    page.resumedAfter = job.lastSeq;
    note("note", null, "page reloaded: resuming after event #" + job.lastSeq, "note resumed");
  }
  if (!job.done) follow();
}

$("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim()) return;
  setStatus("waiting", "submitting");
  const response = await fetch("/chat", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt: prompt }),
  });
  const body = await response.json();
  if (!response.ok) { setStatus("failed", "not submitted: " + body.error); return; }
  if (job) sessionStorage.removeItem(storageKey(job.id));
  history.replaceState(null, "", "#job=" + body.job_id);
  openJob(body.job_id, []);
});

$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});

$("cancel").addEventListener("click", async () => {
  if (!job) return;
  $("cancel").disabled = true;
  const response = await fetch("/chat/" + encodeURIComponent(job.id) + "/cancel", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
  });
  note("note", null, response.ok ? "cancel requested" : "cancel refused: " + response.status, "note");
});

const fromHash = /^#job=([A-Za-z0-9._:-]+)$/.exec(location.hash);
if (fromHash) {
  const kept = sessionStorage.getItem(storageKey(fromHash[1]));
  openJob(fromHash[1], kept ? JSON.parse(kept) : []);
}
