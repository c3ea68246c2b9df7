// The search page: upload a DICOM or open /?sop=UID; the hits are a grid of thumbnails; a click on a hit
// searches from it; Compare shows the query and a hit side by side at a larger size.
"use strict";
let current = null;  // {kind: "sop", sop} or {kind: "file", file}
let queryPicture = null;  // the query image's URL (a thumbnail, or the upload's data URL)

const message = (text, isError) => {
  const target = document.getElementById("message");
  target.textContent = text;
  target.className = isError ? "error" : "";
};

function filterParams() {
  const params = new URLSearchParams();
  params.set("k", document.getElementById("k").value || "12");
  const view = document.getElementById("view").value;
  const laterality = document.getElementById("laterality").value;
  if (view) params.set("view", view);
  if (laterality) params.set("laterality", laterality);
  if (document.getElementById("exclude").checked) params.set("exclude_same_patient", "true");
  return params;
}

function renderQuery(query) {
  const box = document.getElementById("query");
  box.replaceChildren(
    el("img", {src: queryPicture, alt: `Query image: ${describe(query)}`, width: 256}),
    meta([["SOP UID", query.sop_instance_uid], ["Accession", query.accession_number],
          ["Laterality", query.laterality], ["View", query.view], ["Source", query.path]]),
    query.study_key && current && current.kind === "sop"
      ? el("a", {href: `/study?key=${encodeURIComponent(query.study_key)}`, text: "Similar studies"}) : null);
}

function renderHits(result) {
  const list = document.getElementById("hits");
  list.replaceChildren();
  for (const hit of result.hits) {
    const label = `Rank ${hit.rank}, score ${hit.score.toFixed(3)}: ${describe(hit)}`;
    const open = el("button", {class: "open", type: "button", title: "Search from this image",
                               "aria-label": `Search from rank ${hit.rank}`,
                               onclick: () => searchBySop(hit.sop_instance_uid, true)},
                    el("img", {src: api.thumb(hit.sop_instance_uid, 256), alt: label, loading: "lazy", width: 256}));
    const compare = el("button", {type: "button", text: "Compare", "aria-label": `Compare rank ${hit.rank} with the query`,
                                  onclick: () => showCompare(result.query, hit)});
    list.append(el("li", {class: "hit card", "data-sop-instance-uid": hit.sop_instance_uid, "data-rank": hit.rank},
      open,
      meta([["Rank", hit.rank], ["Score", hit.score.toFixed(4)], ["Accession", hit.accession_number],
            ["Side / view", `${hit.laterality || "?"} ${hit.view || "?"}`]]),
      compare));
  }
  if (!result.hits.length) list.append(el("li", {text: "No image passes these filters."}));
}

function showCompare(query, hit) {
  const large = current && current.kind === "sop" ? api.thumb(query.sop_instance_uid, 512) : queryPicture;
  document.getElementById("compare-query").replaceChildren(
    el("img", {src: large, alt: `Query: ${describe(query)}`}), el("figcaption", {text: `Query: ${describe(query)}`}));
  document.getElementById("compare-hit").replaceChildren(
    el("img", {src: api.thumb(hit.sop_instance_uid, 512), alt: `Hit rank ${hit.rank}: ${describe(hit)}`}),
    el("figcaption", {text: `Rank ${hit.rank}, score ${hit.score.toFixed(4)}: ${describe(hit)}`}));
  document.getElementById("compare").showModal();
}

async function searchBySop(sop, push) {
  current = {kind: "sop", sop};
  if (push) history.pushState({sop}, "", `/?sop=${encodeURIComponent(sop)}`);
  message("Searching…");
  try {
    const result = await api.json(`/api/v1/images/${encodeURIComponent(sop)}/similar?${filterParams()}`);
    queryPicture = api.thumb(sop, 256);
    renderQuery(result.query);
    renderHits(result);
    message(`${result.hits.length} similar images in ${Object.values(result.timings_ms).reduce((a, b) => a + b, 0).toFixed(0)} ms`);
  } catch (error) { message(error.message, true); }
}

async function searchByFile(file) {
  current = {kind: "file", file};
  history.pushState({}, "", "/");
  message(`Searching with ${file.name}…`);
  try {
    const params = filterParams();
    params.set("thumbnail", "true");
    const result = await api.json(`/api/v1/query?${params}`, {method: "POST", body: file,
                                                              headers: {"Content-Type": "application/dicom"}});
    queryPicture = result.query_thumbnail;
    renderQuery(result.query);
    renderHits(result);
    message(`${result.hits.length} similar images in ${Object.values(result.timings_ms).reduce((a, b) => a + b, 0).toFixed(0)} ms`);
  } catch (error) { message(`${file.name}: ${error.message}`, true); }
}

function rerun() {
  if (!current) return;
  if (current.kind === "sop") searchBySop(current.sop, false); else searchByFile(current.file);
}

function setUp() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("file");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => { if (input.files.length) searchByFile(input.files[0]); });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) searchByFile(event.dataTransfer.files[0]);
  });
  document.getElementById("filters").addEventListener("change", rerun);
  document.getElementById("filters").addEventListener("submit", (event) => { event.preventDefault(); rerun(); });
  window.addEventListener("popstate", () => {
    const sop = new URLSearchParams(location.search).get("sop");
    if (sop) searchBySop(sop, false);
  });
  const sop = new URLSearchParams(location.search).get("sop");
  if (sop) searchBySop(sop, false);
  showServing();
}

setUp();
