// Submits a demo job (the API takes JSON), then lets htmx render the job's HTML stream.
document.getElementById("start").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const params = { steps: Number(form.get("steps")), interval: Number(form.get("interval")) };
  const response = await fetch("/jobs", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ type: "demo", params }),
  });
  const job = await response.json();
  const holder = document.getElementById("job-template").content.firstElementChild.cloneNode(true);
  holder.setAttribute("sse-connect", `${job.links.events}?format=html`);
  holder.textContent = `${job.id}: queued`;
  document.getElementById("jobs").prepend(holder);
  htmx.process(holder);
});
