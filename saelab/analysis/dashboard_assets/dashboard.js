// saelab dashboard: static pages that read their data from script files (data/*.js), so they open from disk
// (file://) with no server: each data file calls saelab.index(...) or saelab.chunk(...).
"use strict";
const saelab = { waiting: {} };

function loadData(name) {
  return new Promise((resolve, reject) => {
    saelab.waiting[name] = resolve;
    const script = document.createElement("script");
    script.src = "data/" + name + ".js";
    script.onerror = () => reject(new Error("cannot read data/" + name + ".js"));
    document.head.appendChild(script);
  });
}
saelab.index = (data) => saelab.waiting["index"](data);
saelab.chunk = (number, latents) => saelab.waiting["chunk_" + String(number).padStart(4, "0")](latents);

function element(tag, text, attributes) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
  return node;
}
const percent = (x) => (100 * x).toPrecision(3) + "%";
const number = (x) => (x === 0 ? "0" : x.toPrecision(3));
const shown = (token) => token.replace(/\n/g, "\u21b5");

// ----- index page ----------------------------------------------------------------------------------------
async function saelabIndexPage() {
  const data = await loadData("index");
  const rows = data.latents;
  document.getElementById("title").textContent = data.title;
  document.getElementById("summary").textContent = data.summary;
  const state = { key: "id", descending: false, query: "", page: 0, perPage: 100 };
  // the address can carry a search and a sort order: index.html#q=cat&sort=density
  const wanted = new URLSearchParams(location.hash.slice(1));
  if (wanted.has("q")) state.query = wanted.get("q").trim().toLowerCase();
  if (["density", "max", "mean"].includes(wanted.get("sort"))) { state.key = wanted.get("sort"); state.descending = true; }
  document.getElementById("search").value = state.query;
  const headers = document.querySelectorAll("th[data-key]");
  for (const th of headers) {
    th.addEventListener("click", () => {
      state.descending = state.key === th.dataset.key ? !state.descending : th.dataset.key !== "id";
      state.key = th.dataset.key;
      state.page = 0;
      render();
    });
  }
  document.getElementById("search").addEventListener("input", (event) => {
    state.query = event.target.value.trim().toLowerCase();
    state.page = 0;
    render();
  });
  document.getElementById("prev").addEventListener("click", () => { state.page -= 1; render(); });
  document.getElementById("next").addEventListener("click", () => { state.page += 1; render(); });

  function matches(row) {
    if (!state.query) return true;
    if (String(row.id) === state.query) return true;
    return [row.top, row.logits, row.explanation || ""].some((text) => text.toLowerCase().includes(state.query));
  }
  function render() {
    const selected = rows.filter(matches);
    const sign = state.descending ? -1 : 1;
    selected.sort((a, b) => sign * (a[state.key] - b[state.key]) || a.id - b.id);
    const pages = Math.max(1, Math.ceil(selected.length / state.perPage));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    document.getElementById("page").textContent = "page " + (state.page + 1) + " of " + pages;
    document.getElementById("count").textContent = selected.length + " latents";
    for (const th of headers) th.classList.toggle("sorted", th.dataset.key === state.key);
    const body = document.querySelector("#latents tbody");
    body.replaceChildren();
    for (const row of selected.slice(state.page * state.perPage, (state.page + 1) * state.perPage)) {
      const tr = element("tr", null, { "data-latent": row.id });
      const cell = element("td");
      cell.appendChild(element("a", String(row.id), { href: "latent.html#" + row.id }));
      tr.appendChild(cell);
      tr.appendChild(element("td", percent(row.density)));
      tr.appendChild(element("td", number(row.max)));
      tr.appendChild(element("td", number(row.mean)));
      tr.appendChild(element("td", row.top, { class: "tokens" }));
      tr.appendChild(element("td", row.logits, { class: "tokens" }));
      tr.appendChild(element("td", row.explanation || ""));
      body.appendChild(tr);
    }
  }
  render();
}

// ----- latent page ---------------------------------------------------------------------------------------
async function saelabLatentPage() {
  const index = await loadData("index");
  async function show() {
    const id = parseInt(location.hash.slice(1) || "0", 10);
    const chunk = Math.floor(id / index.chunk_size);
    const latents = await loadData("chunk_" + String(chunk).padStart(4, "0"));
    render(latents[id - chunk * index.chunk_size], index);
  }
  window.addEventListener("hashchange", show);
  await show();
}

function render(latent, index) {
  document.title = "latent " + latent.id;
  document.getElementById("title").textContent = index.title + " · latent " + latent.id;
  document.getElementById("summary").textContent =
    "fires on " + percent(latent.density) + " of " + index.n_tokens.toLocaleString() + " tokens · max activation " +
    number(latent.max) + " · mean when firing " + number(latent.mean);
  const explained = latent.explanation;  // from an auto-interpretation result, when the dashboard was given one
  document.getElementById("explanation").textContent = explained
    ? "Explanation: " + explained.explanation + " (detection " + number(explained.detection) +
      (explained.fuzzing === null || explained.fuzzing === undefined ? "" : ", fuzzing " + number(explained.fuzzing)) +
      (explained.llm ? "; by " + explained.llm : "") + ")"
    : "";
  const previous = document.getElementById("previous"), following = document.getElementById("following");
  previous.href = "#" + Math.max(0, latent.id - 1);
  following.href = "#" + Math.min(index.d_sae - 1, latent.id + 1);
  histogram(document.getElementById("histogram"), latent.histogram, latent.bin_width);
  logitTable(document.getElementById("promoted"), latent.promoted, "pos");
  logitTable(document.getElementById("suppressed"), latent.suppressed, "neg");
  const enrichment = document.getElementById("enrichment");
  enrichment.replaceChildren();
  for (const [name, ratio] of latent.enrichment) {
    const tr = element("tr");
    tr.appendChild(element("td", name));
    tr.appendChild(element("td", ratio.toFixed(2) + "x"));
    enrichment.appendChild(tr);
  }
  const contexts = document.getElementById("contexts");
  contexts.replaceChildren();
  if (latent.contexts.length === 0) contexts.appendChild(element("p", "This latent never fired on the corpus."));
  for (const context of latent.contexts) {
    const line = element("div", null, { class: "context" });
    line.appendChild(element("span", number(context.value), { class: "value" }));
    context.tokens.forEach((token, i) => {
      const act = context.acts[i];
      const span = element("span", shown(token), { class: "token" + (i === context.at ? " max" : ""),
                                                   title: "activation " + number(act) });
      if (act > 0) span.style.background = "rgba(255, 140, 0, " + Math.min(1, act / latent.max).toFixed(3) + ")";
      line.appendChild(span);
    });
    contexts.appendChild(line);
  }
}

function logitTable(table, entries, kind) {
  table.replaceChildren();
  for (const [token, value] of entries) {
    const tr = element("tr");
    tr.appendChild(element("td", shown(token), { class: "tokens" }));
    tr.appendChild(element("td", (value > 0 ? "+" : "") + value.toFixed(3), { class: kind }));
    table.appendChild(tr);
  }
}

function histogram(container, counts, binWidth) {
  const width = 320, height = 120, ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height + 18);
  const tallest = Math.max(1, ...counts), bar = width / counts.length;
  counts.forEach((count, i) => {
    const rect = document.createElementNS(ns, "rect"), h = (height * count) / tallest;
    rect.setAttribute("x", i * bar); rect.setAttribute("y", height - h);
    rect.setAttribute("width", Math.max(1, bar - 1)); rect.setAttribute("height", h);
    rect.setAttribute("fill", "#e08a2c");
    const tip = document.createElementNS(ns, "title");
    tip.textContent = number(i * binWidth) + " to " + number((i + 1) * binWidth) + ": " + count;
    rect.appendChild(tip);
    svg.appendChild(rect);
  });
  for (const [x, anchor, label] of [[0, "start", "0"], [width, "end", number(counts.length * binWidth)]]) {
    const text = document.createElementNS(ns, "text");
    text.setAttribute("x", x); text.setAttribute("y", height + 14); text.setAttribute("font-size", "11");
    text.setAttribute("text-anchor", anchor); text.textContent = label;
    svg.appendChild(text);
  }
  container.replaceChildren(svg);
}
