// Minimal demo: start a job, watch it over SSE. The full client is static/progress.js.
const jobs = document.getElementById("jobs");
document.getElementById("start").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  const params = { steps: Number(form.get("steps")), interval: Number(form.get("interval")) };
  const res = await fetch("/jobs", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ type: "demo", params }),
  });
  const doc = await res.json();
  const card = document.createElement("p");
  const bar = document.createElement("progress");
  bar.max = 100;
  const text = document.createElement("span");
  card.append(bar, " ", text);
  jobs.prepend(card);
  const source = new EventSource(doc.links.events);
  const render = (ev) => {
    const job = JSON.parse(ev.data);
    bar.value = job.progress ?? 0;
    text.textContent = `${job.status} ${job.message ?? ""}`;
    if (["succeeded", "failed", "cancelled"].includes(job.status)) source.close();
  };
  for (const name of ["progress", "succeeded", "failed", "cancelled"]) source.addEventListener(name, render);
});
