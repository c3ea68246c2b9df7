// The QC page: the latest sweep's outliers, what is new since the previous one, duplicate pairs, header flags.
"use strict";
function outlierCard(row) {
  const label = `Outlier rank ${row.rank}, score ${row.score.toFixed(4)}: ${describe(row)}`;
  return el("li", {class: "card", "data-sop-instance-uid": row.sop_instance_uid},
    el("a", {href: `/?sop=${encodeURIComponent(row.sop_instance_uid)}`, title: "Search similar images"},
       el("img", {src: api.thumb(row.sop_instance_uid, 256), alt: label, loading: "lazy", width: 256})),
    meta([["Rank", row.rank], ["Score", row.score.toFixed(4)], ["Previous rank", row.previous_rank],
          ["Accession", row.accession_number], ["Side / view", `${row.laterality || "?"} ${row.view || "?"}`]]),
    row.flags.length ? el("p", {class: "flag", text: row.flags.join(", ")}) : null,
    row.new ? el("span", {class: "new", text: "new"}) : null);
}

function pairCard(pair) {
  const figure = (image, which) => el("figure", {"data-sop-instance-uid": image.sop_instance_uid},
    el("img", {src: api.thumb(image.sop_instance_uid, 256), alt: `Duplicate ${which}: ${describe(image)}`, loading: "lazy"}),
    el("figcaption", {text: describe(image)}));
  return el("li", {class: "card"},
    el("div", {class: "pair"}, figure(pair.a, "a"), figure(pair.b, "b")),
    meta([["Cosine", pair.similarity.toFixed(5)],
          ["Pixel correlation", pair.pixel_correlation === null ? null : pair.pixel_correlation.toFixed(4)]]));
}

async function load() {
  showServing();
  const summary = document.getElementById("summary");
  let sweep;
  try { sweep = await api.json("/api/v1/qc/latest?top=30"); }
  catch (error) { summary.textContent = error.message; summary.className = "error"; return; }
  const top = sweep.scores.filter((row) => row.rank <= 30);
  const fresh = top.filter((row) => row.new);
  const flagged = sweep.scores.filter((row) => row.flags.length);
  summary.textContent = `Sweep ${sweep.run_id} (${sweep.method}, model ${sweep.model_key}, ${sweep.created_at}) over ${sweep.n_images} images: ` +
    `${sweep.duplicates.length} duplicate pairs, ${flagged.length} flagged images` +
    (sweep.previous_run_id ? `, compared with sweep ${sweep.previous_run_id}.` : "; no earlier sweep to compare with.");
  document.getElementById("outliers").replaceChildren(...top.map(outlierCard));
  document.getElementById("new").replaceChildren(...(fresh.length ? fresh.map(outlierCard)
    : [el("li", {text: sweep.previous_run_id ? "Nothing new in the top 30." : "No previous sweep."})]));
  document.getElementById("duplicates").replaceChildren(...(sweep.duplicates.length ? sweep.duplicates.map(pairCard)
    : [el("li", {text: "No near-duplicate pairs."})]));
  document.getElementById("flags").replaceChildren(...flagged.map((row) => el("tr", {"data-sop-instance-uid": row.sop_instance_uid},
    el("td", {text: String(row.rank)}),
    el("td", {}, el("a", {href: `/?sop=${encodeURIComponent(row.sop_instance_uid)}`, text: row.sop_instance_uid})),
    el("td", {text: row.accession_number || "–"}),
    el("td", {text: `${row.laterality || "?"} ${row.view || "?"}`}),
    el("td", {class: "flag", text: row.flags.join(", ")}))));
}

load();
