// Renders /openapi.json as a readable list of routes (no external assets).
const el = (tag, text) => Object.assign(document.createElement(tag), text === undefined ? {} : { textContent: text });

async function render() {
  const spec = await (await fetch("/openapi.json")).json();
  const root = document.getElementById("routes");
  root.textContent = "";
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const section = el("section");
      const title = el("h2");
      title.append(Object.assign(el("span", method.toUpperCase()), { className: "method" }), path);
      section.append(title, el("p", op.summary || ""));
      if (op.description) section.append(el("pre", op.description));
      const params = (op.parameters || []).map((p) => `${p.name} (${p.in})${p.description ? ": " + p.description : ""}`);
      if (params.length) section.append(el("p", "Parameters: " + params.join("; ")));
      section.append(el("p", "Answers: " + Object.entries(op.responses).map(([code, r]) => `${code} ${r.description}`).join("; ")));
      root.append(section);
    }
  }
}
render();
