// The study page: the query study's views in a row, each similar study's views in a row beneath.
"use strict";
function viewFigure(image, prefix) {
  const label = `${prefix}: ${image.laterality || "?"} ${image.view || "?"}` + (image.score !== undefined ? `, score ${image.score.toFixed(3)}` : "");
  return el("figure", {class: "card", "data-sop-instance-uid": image.sop_instance_uid},
    el("a", {href: `/?sop=${encodeURIComponent(image.sop_instance_uid)}`, title: "Similar images"},
       el("img", {src: api.thumb(image.sop_instance_uid, 256), alt: label, loading: "lazy", width: 200})),
    el("figcaption", {text: label}));
}

async function search(push) {
  const key = document.getElementById("key").value.trim();
  if (!key) return;
  const params = new URLSearchParams({k: document.getElementById("k").value || "5", rule: document.getElementById("rule").value});
  if (document.getElementById("exclude").checked) params.set("exclude_same_patient", "true");
  if (push) history.pushState({}, "", `/study?key=${encodeURIComponent(key)}`);
  const message = document.getElementById("message");
  message.textContent = "Searching…"; message.className = "";
  try {
    const result = await api.json(`/api/v1/studies/${encodeURIComponent(key)}/similar?${params}`);
    const q = result.query;
    document.getElementById("query").replaceChildren(
      meta([["Study", q.study_key], ["Accession", q.accession_number], ["Images", q.images.length]]),
      el("div", {class: "views"}, ...q.images.map((image) => viewFigure(image, "Query"))));
    document.getElementById("studies").replaceChildren(...result.hits.map((hit) => el("li", {class: "study-row", "data-study-key": hit.study_key},
      meta([["Rank", hit.rank], ["Score", hit.score.toFixed(4)], ["Accession", hit.accession_number],
            ["Views matched", hit.views_matched.length ? hit.views_matched.join(", ") : "none in common (scored over any view)"]]),
      el("a", {href: `/study?key=${encodeURIComponent(hit.accession_number || hit.study_key)}`, text: "Search from this study"}),
      el("div", {class: "views"}, ...hit.images.map((image) => viewFigure(image, `Rank ${hit.rank}`))))));
    message.textContent = `${result.hits.length} similar studies (${result.rule})`;
  } catch (error) { message.textContent = error.message; message.className = "error"; }
}

document.getElementById("study-form").addEventListener("submit", (event) => { event.preventDefault(); search(true); });
const initial = new URLSearchParams(location.search).get("key");
if (initial) { document.getElementById("key").value = initial; search(false); }
showServing();
