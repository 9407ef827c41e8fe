// No-op Node.js function: measures the platform, not the handler.
export const handler = async () => ({ ok: true });
