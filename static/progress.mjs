// ES module entry of progress.js: import { watchJob, watchJobs } from "/static/progress.mjs";
import "./progress.js";

const client = globalThis.ProgressClient;
export const watchJob = client.watchJob;
export const watchJobs = client.watchJobs;
export default client;
