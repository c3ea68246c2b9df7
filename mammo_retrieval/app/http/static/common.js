// Shared by the pages. Every header string reaches the page through textContent or an attribute, never HTML.
"use strict";
const api = {
  async json(url, options) {
    const response = await fetch(url, Object.assign({credentials: "same-origin"}, options || {}));
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const message = body && body.message ? body.message : `HTTP ${response.status}`;
      const error = new Error(message + (body && body.hint ? ` (${body.hint})` : ""));
      error.status = response.status;
      throw error;
    }
    return body;
  },
  thumb(sop, size) { return `/api/v1/images/${encodeURIComponent(sop)}/thumbnail.png?size=${size || 256}`; },
};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function meta(pairs) {
  const dl = el("dl", {class: "meta"});
  for (const [label, value] of pairs) {
    dl.append(el("dt", {text: label}), el("dd", {text: value === null || value === undefined || value === "" ? "–" : String(value)}));
  }
  return dl;
}

function describe(image) {
  return [image.laterality || "?", image.view || "?"].join(" ") + (image.accession_number ? `, accession ${image.accession_number}` : "");
}

async function showServing() {
  const target = document.getElementById("serving");
  try {
    const info = await api.json("/api/v1/info");
    target.textContent = `live model ${info.model_key} (${info.encoder} on ${info.runtime}${info.random_weights ? ", RANDOM weights" : ""}) · ${info.ntotal} images indexed (${info.index_type}) · v${info.version}`;
  } catch (error) {
    target.textContent = `not serving yet: ${error.message}`;
  }
}
