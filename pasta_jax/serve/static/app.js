"use strict";

const $ = (id) => document.getElementById(id);
let session = null;

function showMessage(text, kind) {
  const bar = $("message");
  bar.textContent = text || "";
  bar.className = text ? kind : "";
}

async function api(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch (e) {
    throw new Error("The server cannot be reached; is `python -m pasta_jax.serve` still running?");
  }
  const data = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
  if (!response.ok) throw new Error(data.error || `the server answered ${response.status}`);
  return data;
}

function drawPosterior(probs, labels) {
  const svg = $("posterior");
  const barHeight = 22, gap = 8, labelWidth = 120, barMax = 130;
  svg.setAttribute("height", probs.length * (barHeight + gap) + 24);
  svg.setAttribute("data-posterior", JSON.stringify(probs.map((p) => Number(p.toFixed(6)))));
  const bars = probs.map((p, k) => {
    const y = k * (barHeight + gap);
    const w = Math.max(1, p * barMax);
    return `<text x="0" y="${y + 15}" font-size="11">${labels[k]}</text>` +
      `<rect class="bar" data-type="${k}" x="${labelWidth}" y="${y}" width="${w.toFixed(1)}" ` +
      `height="${barHeight}" fill="#4e79a7"></rect>` +
      `<text x="${labelWidth + w + 4}" y="${y + 15}" font-size="11">${p.toFixed(2)}</text>`;
  });
  const axisY = probs.length * (barHeight + gap) + 12;
  svg.innerHTML = bars.join("") +
    `<text x="${labelWidth}" y="${axisY}" font-size="10">0</text>` +
    `<text x="${labelWidth + barMax - 4}" y="${axisY}" font-size="10">1</text>` +
    `<text x="${labelWidth + 20}" y="${axisY}" font-size="10">probability</text>`;
}

function column(option) {
  const div = document.createElement("div");
  div.className = "column";
  div.innerHTML = `<div class="text"></div><span class="category"></span><div class="images"></div>`;
  div.querySelector(".text").textContent = option.text;
  div.querySelector(".category").textContent = option.category;
  option.srcs.forEach((src, m) => {
    const img = document.createElement("img");
    img.src = src;
    img.alt = `image ${m + 1} of "${option.text}"`;
    div.querySelector(".images").appendChild(img);
  });
  const button = document.createElement("button");
  button.className = "choose";
  button.dataset.column = option.column;
  button.textContent = `Choose column ${option.column + 1}`;
  button.addEventListener("click", () => choose(option.column));
  div.appendChild(button);
  return div;
}

function render(view) {
  session = view;
  $("setup").classList.add("hidden");
  $("layout").classList.remove("hidden");
  $("status").textContent = view.done
    ? `Done: ${view.turns} turns with agent ${view.policy}.`
    : `Turn ${view.turn + 1} of ${view.turns}, agent ${view.policy}: click the column you like best.`;
  $("status").dataset.turn = view.turn;
  $("matched").textContent = view.typed_prompt
    ? `You typed "${view.typed_prompt}"; the session starts from the nearest start prompt ` +
      `"${view.start_prompt}" (similarity ${view.similarity.toFixed(2)}).`
    : `Start prompt: "${view.start_prompt}".`;
  $("current").textContent = view.current_prompt;
  const slate = $("slate");
  slate.innerHTML = "";
  view.slate.forEach((option) => slate.appendChild(column(option)));
  $("history").innerHTML = "";
  view.history.forEach((text, t) => {
    const li = document.createElement("li");
    li.textContent = `turn ${t + 1}: column ${view.choices[t] + 1}: ${text}`;
    $("history").appendChild(li);
  });
  drawPosterior(view.posterior, view.type_labels);
  $("done").classList.toggle("hidden", !view.done);
  $("saved").textContent = view.saved || "";
}

async function choose(index) {
  document.querySelectorAll("button.choose").forEach((b) => (b.disabled = true));
  try {
    render(await api("POST", `/api/sessions/${session.session_id}/choose`, { column: index }));
    showMessage("", "");
  } catch (e) {
    showMessage(e.message, "error");
    document.querySelectorAll("button.choose").forEach((b) => (b.disabled = false));
  }
}

async function start() {
  const body = { policy: $("policy").value, prompt: $("prompt").value, start: null };
  if ($("start").value !== "") body.start = Number($("start").value);
  $("start-button").disabled = true;
  showMessage("Starting (the first slate of an agent compiles; a few seconds)...", "info");
  try {
    render(await api("POST", "/api/sessions", body));
    showMessage("", "");
  } catch (e) {
    showMessage(e.message, "error");
  } finally {
    $("start-button").disabled = false;
  }
}

async function exportSession() {
  try {
    const out = await api("POST", `/api/sessions/${session.session_id}/export`);
    $("exported").textContent = `Exported to ${out.path}`;
  } catch (e) {
    showMessage(e.message, "error");
  }
}

async function init() {
  let info;
  try {
    info = await api("GET", "/api/info");
  } catch (e) {
    showMessage(e.message, "error");
    return;
  }
  if (!info.ok) {
    showMessage(info.error, "error");
    $("start-button").disabled = true;
    return;
  }
  $("workdir").textContent = `workdir: ${info.workdir}`;
  if (info.notice) {
    $("notice").textContent = info.notice;
    $("notice").style.display = "block";
  }
  info.policies.forEach((name) => $("policy").add(new Option(name, name)));
  info.starts.forEach((text, i) => $("start").add(new Option(text, String(i))));
  $("mapping-note").textContent = info.mapping_note;
  $("image-note").textContent = info.image_note;
  $("start-button").addEventListener("click", start);
  $("export").addEventListener("click", exportSession);
  $("again").addEventListener("click", () => {
    $("layout").classList.add("hidden");
    $("setup").classList.remove("hidden");
  });
}

init();
