import { useEffect, useState } from "react";
import { watchJob, type JobDocument } from "progress-server-client";

/** The latest document of a job (null until the first arrives); the watch stops on unmount. */
export function useJob(id: string | null, token?: string): JobDocument | null {
  const [job, setJob] = useState<JobDocument | null>(null);
  useEffect(() => {
    setJob(null);
    if (!id) return;
    const watcher = watchJob(id, { onUpdate: (doc) => setJob(doc), token });
    return () => watcher.close();
  }, [id, token]);
  return job;
}
