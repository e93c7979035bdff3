// /docs: Swagger UI (vendored in static/vendor/) over this server's /openapi.json.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger",
  deepLinking: true,
  displayRequestDuration: true,
  defaultModelsExpandDepth: 0,
});
