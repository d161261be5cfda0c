// saelab attribution graph page: draws a graph in circuit-tracer's JSON layout as SVG, from data/graph_<slug>.js
// (a script, so the page opens from disk with no server). Columns are prompt positions, rows are layers (token
// embeddings at the bottom, logits at the top). Hover a node for its details; click it to keep only its edges
// bright and list its inputs and outputs; click the background to let go. "fit to width" scales the drawing
// into the window.
"use strict";
const loaded = {};
function saelabGraphs(slugs) { loaded.graphs(slugs); }
function saelabGraph(data) { loaded.graph(data); }

function loadScript(name, key) {
  return new Promise((resolve, reject) => {
    loaded[key] = resolve;
    const script = document.createElement("script");
    script.src = "data/" + name + ".js";
    script.onerror = () => reject(new Error("cannot read data/" + name + ".js"));
    document.head.appendChild(script);
  });
}

const SVG = "http://www.w3.org/2000/svg";
function svgElement(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}
function element(tag, text, attributes) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
  return node;
}
const shown = (token) => token.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
const number = (x) => (x === null || x === undefined ? "" : x === 0 ? "0" : (+x).toPrecision(3));
const KIND = { "cross layer transcoder": "feature", "mlp reconstruction error": "error", embedding: "embedding",
  logit: "logit" };

function describe(node, tokens) {
  const kind = KIND[node.feature_type] || node.feature_type;
  const at = `"${shown(tokens[node.ctx_idx] || "")}" (position ${node.ctx_idx})`;
  if (kind === "feature") {
    const latent = node.node_id.split("_")[1];
    return `latent ${latent} of layer ${node.layer} at ${at}`;
  }
  if (kind === "error") return `error of layer ${node.layer}'s MLP at ${at}`;
  if (kind === "embedding") return `token embedding of ${at}`;
  return node.clerp || `logit ${node.feature}`;
}

async function saelabGraphPage() {
  const slugs = await loadScript("graphs", "graphs");
  const wanted = decodeURIComponent(location.hash.slice(1));
  const slug = slugs.includes(wanted) ? wanted : slugs[slugs.length - 1];
  const choice = document.getElementById("choice");
  for (const s of slugs) choice.appendChild(element("option", s, s === slug ? { value: s, selected: "" } : { value: s }));
  choice.addEventListener("change", () => { location.hash = choice.value; location.reload(); });
  const data = await loadScript("graph_" + slug, "graph");
  document.getElementById("json").setAttribute("href", slug + ".json");
  render(data);
}

function layout(data) {
  const tokens = data.metadata.prompt_tokens;
  const nodes = data.nodes.map((node, index) => ({ ...node, index, kind: KIND[node.feature_type] || "feature",
    inputs: [], outputs: [] }));
  const layers = [...new Set(nodes.filter((n) => n.layer !== "E" && n.kind !== "logit").map((n) => +n.layer))];
  const top = layers.length ? Math.max(...layers) : 0;
  const rowOf = (n) => (n.kind === "embedding" ? 0 : n.kind === "logit" ? top + 2 : +n.layer + 1);
  const cells = new Map();
  for (const n of nodes) {
    const key = rowOf(n) + "," + n.ctx_idx;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const rowHeight = 44, left = 46, bottom = 40, topMargin = 30;
  const stepOf = (group) => (group[0].kind === "logit" ? 56 : 16); // logits leave room for their labels
  const widths = tokens.map(() => 60);
  for (const [key, group] of cells) {
    const position = +key.split(",")[1];
    widths[position] = Math.max(widths[position], group.length * stepOf(group) + 20);
    group.sort((a, b) => (a.influence ?? 0) - (b.influence ?? 0) || (b.token_prob || 0) - (a.token_prob || 0));
  }
  const starts = [];
  widths.reduce((x, w, i) => { starts[i] = x; return x + w; }, left);
  const rows = top + 3;
  const height = topMargin + rows * rowHeight + bottom;
  for (const group of cells.values()) {
    group.forEach((n, i) => {
      n.x = starts[n.ctx_idx] + widths[n.ctx_idx] / 2 + (i - (group.length - 1) / 2) * stepOf(group);
      n.y = topMargin + (rows - 1 - rowOf(n)) * rowHeight + rowHeight / 2;
    });
  }
  const byId = new Map(nodes.map((n) => [n.node_id, n]));
  const links = data.links
    .filter((l) => byId.has(l.source) && byId.has(l.target))
    .map((l) => ({ ...l, from: byId.get(l.source), to: byId.get(l.target) }));
  for (const l of links) { l.from.outputs.push(l); l.to.inputs.push(l); }
  const width = starts[tokens.length - 1] + widths[tokens.length - 1] + 10;
  return { tokens, nodes, links, byId, starts, widths, rows, rowHeight, topMargin, width, height, top };
}

function render(data) {
  const g = layout(data);
  const extra = data.saelab || {};
  const scores = extra.scores || {};
  document.getElementById("title").textContent = `Attribution graph: ${data.metadata.slug}`;
  document.getElementById("prompt").replaceChildren(...g.tokens.map((t) => element("span", shown(t), { class: "token" })));
  const parts = [data.metadata.scan];
  if (scores.replacement !== undefined) {
    parts.push(`replacement score ${number(scores.replacement)} (pruned ${number(scores.pruned_replacement)})`);
    parts.push(`completeness ${number(scores.completeness)} (pruned ${number(scores.pruned_completeness)})`);
  }
  if (extra.n_active_features !== undefined) parts.push(`${extra.n_active_features} active latents`);
  document.getElementById("summary").textContent = parts.join(" \u00b7 ");

  const svg = svgElement("svg", { width: g.width, height: g.height, id: "graph" });
  const edgeLayer = svgElement("g"), nodeLayer = svgElement("g"), axisLayer = svgElement("g");
  svg.append(axisLayer, edgeLayer, nodeLayer);
  for (let row = 0; row < g.rows; row++) {
    const label = row === 0 ? "Emb" : row === g.rows - 1 ? "Logit" : "L" + (row - 1);
    const y = g.topMargin + (g.rows - 1 - row) * g.rowHeight + g.rowHeight / 2 + 4;
    axisLayer.appendChild(svgElement("text", { x: 4, y, class: "axis" }, label));
  }
  g.tokens.forEach((token, i) => {
    const x = g.starts[i] + g.widths[i] / 2;
    axisLayer.appendChild(svgElement("text", { x, y: g.height - 14, "text-anchor": "middle", class: "axis" },
      shown(token).slice(0, 12)));
  });
  const largest = Math.max(1e-12, ...g.links.map((l) => Math.abs(l.weight)));
  for (const l of g.links) {
    const middle = (l.from.y + l.to.y) / 2;
    l.element = svgElement("path", {
      d: `M${l.from.x},${l.from.y} C${l.from.x},${middle} ${l.to.x},${middle} ${l.to.x},${l.to.y}`,
      class: "edge " + (l.weight >= 0 ? "positive" : "negative"),
      "stroke-width": (0.4 + 3.6 * Math.abs(l.weight) / largest).toFixed(2),
    });
    edgeLayer.appendChild(l.element);
  }
  for (const n of g.nodes) {
    const attributes = { class: `node ${n.kind}${n.is_target_logit ? " target" : ""}`, "data-node": n.node_id };
    n.element = n.kind === "feature"
      ? svgElement("circle", { ...attributes, cx: n.x, cy: n.y, r: 6 })
      : svgElement("rect", { ...attributes, x: n.x - 6, y: n.y - 6, width: 12, height: 12 });
    nodeLayer.appendChild(n.element);
    if (n.kind === "logit") {
      const [, token, p] = n.clerp.match(/^Output "(.*)" \(p=(.*)\)$/s) || [null, String(n.feature), ""];
      const label = svgElement("text", { x: n.x, y: n.y - 10, "text-anchor": "middle" });
      label.append(svgElement("tspan", {}, shown(token).slice(0, 8)), svgElement("tspan", { x: n.x, dy: -11 }, p));
      nodeLayer.appendChild(label);
    }
  }
  const canvas = document.getElementById("canvas");
  canvas.replaceChildren(svg);
  fitToWidth(g, svg);
  interact(g, svg);
}

// Long prompts draw wider than the window and the frame scrolls; "fit to width" (or ?fit=1 in the address, for
// screenshots) scales the whole drawing into the frame instead.
function fitToWidth(g, svg) {
  const box = document.getElementById("fit");
  if (new URLSearchParams(location.search).get("fit") === "1") box.checked = true;
  function apply() {
    svg.setAttribute("viewBox", `0 0 ${g.width} ${g.height}`);
    svg.setAttribute("width", box.checked ? "100%" : g.width);
    svg.setAttribute("height", box.checked ? "auto" : g.height);
    document.getElementById("canvas").classList.toggle("fit", box.checked);
  }
  box.onchange = apply;
  apply();
}

function interact(g, svg) {
  const tooltip = document.getElementById("tooltip");
  const details = document.getElementById("details");
  const slider = document.getElementById("threshold");
  const counts = document.getElementById("counts");
  let chosen = null;

  function visible(n) {
    return n.kind === "embedding" || n.kind === "logit" || (n.influence ?? 0) <= +slider.value;
  }
  function refresh() {
    document.getElementById("threshold-value").textContent = (+slider.value).toFixed(2);
    let shownNodes = 0, shownLinks = 0;
    for (const n of g.nodes) { n.element.style.display = visible(n) ? "" : "none"; shownNodes += visible(n); }
    for (const l of g.links) {
      const on = visible(l.from) && visible(l.to);
      l.element.style.display = on ? "" : "none";
      shownLinks += on;
    }
    counts.textContent = `${shownNodes} nodes, ${shownLinks} edges`;
  }
  slider.addEventListener("input", refresh);
  refresh();

  function choose(n) {
    chosen = n;
    svg.classList.toggle("focused", n !== null);
    for (const m of g.nodes) m.element.classList.remove("near", "chosen");
    for (const l of g.links) l.element.classList.remove("near");
    if (n === null) {
      details.replaceChildren(element("p", "Hover a node for its details; click it to follow its edges.",
        { class: "hint" }));
      return;
    }
    n.element.classList.add("near", "chosen");
    for (const l of [...n.inputs, ...n.outputs]) {
      l.element.classList.add("near");
      l.from.element.classList.add("near");
      l.to.element.classList.add("near");
    }
    details.replaceChildren(...panel(n, g.tokens));
    details.querySelectorAll("tr[data-node]").forEach((row) =>
      row.addEventListener("click", () => choose(g.byId.get(row.dataset.node))));
  }
  svg.addEventListener("click", (event) => {
    const id = event.target.dataset ? event.target.dataset.node : undefined;
    choose(id ? g.byId.get(id) : null);
  });
  svg.addEventListener("mousemove", (event) => {
    const id = event.target.dataset ? event.target.dataset.node : undefined;
    if (!id) { tooltip.hidden = true; return; }
    const n = g.byId.get(id);
    tooltip.replaceChildren(...summaryLines(n, g.tokens).map((line) => element("div", line)));
    tooltip.hidden = false;
    tooltip.style.left = event.clientX + 14 + "px";
    tooltip.style.top = event.clientY + 10 + "px";
  });
  svg.addEventListener("mouseleave", () => { tooltip.hidden = true; });
  const pinned = new URLSearchParams(location.search).get("node");
  if (pinned && g.byId.has(pinned)) choose(g.byId.get(pinned));
}

function summaryLines(n, tokens) {
  const lines = [describe(n, tokens), `node ${n.node_id}`];
  if (n.activation !== null && n.activation !== undefined) lines.push(`activation ${number(n.activation)}`);
  if (n.influence !== null && n.influence !== undefined) lines.push(`cumulative influence ${number(n.influence)}`);
  lines.push(`${n.inputs.length} inputs, ${n.outputs.length} outputs`);
  return lines;
}

function edgeTable(title, links, other) {
  const parts = [element("h2", `${title} (${links.length})`)];
  const table = element("table");
  for (const l of [...links].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 40)) {
    const node = other(l);
    const row = element("tr", null, { "data-node": node.node_id });
    row.append(element("td", number(l.weight), { class: l.weight >= 0 ? "pos" : "neg" }),
      element("td", node.label));
    table.appendChild(row);
  }
  parts.push(table);
  return parts;
}

function panel(n, tokens) {
  const label = (m) => { m.label = describe(m, tokens); return m; };
  const parts = [element("h2", describe(n, tokens))];
  for (const line of summaryLines(n, tokens).slice(1)) parts.push(element("div", line));
  parts.push(...edgeTable("inputs", n.inputs, (l) => label(l.from)));
  parts.push(...edgeTable("outputs", n.outputs, (l) => label(l.to)));
  return parts;
}
