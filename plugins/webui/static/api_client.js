// Calls to this server's OpenAI API.  A 401 asks for the key (askKey) and tries again with it;
// the key is kept in the browser (keyStore) and sent as "Authorization: Bearer".  Errors carry the
// server's own message (error.message of the body), which the page shows as text.
import { sseData } from "./sse_reader.js";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const message = JSON.parse(text)?.error?.message;
    if (typeof message === "string" && message) return message;
  } catch { /* not JSON: the status says it */ }
  return `The server answered ${response.status} ${response.statusText}`.trim();
}

export class ApiClient {
  // keyStore: {get(), set(key)}; askKey(reason) resolves to a key, or null when the user gives none.
  constructor(keyStore, askKey) {
    this.keyStore = keyStore;
    this.askKey = askKey;
  }

  async request(path, init = {}) {
    for (;;) {
      const headers = { ...(init.headers || {}) };
      const key = this.keyStore.get();
      if (key) headers.Authorization = `Bearer ${key}`;
      const response = await fetch(path, { ...init, headers });
      if (response.ok) return response;
      const message = await errorMessage(response);
      if (response.status !== 401) throw new ApiError(response.status, message);
      const given = await this.askKey(message);
      if (!given) throw new ApiError(401, message);
      this.keyStore.set(given);
    }
  }

  async models() {
    const response = await this.request("/v1/models");
    const body = await response.json();
    return (body.data || []).map((model) => model.id);
  }

  // The chunks of a streamed chat completion, parsed; an error event ends it with an ApiError.
  async* chat(body, signal) {
    const response = await this.request("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal,
    });
    for await (const data of sseData(response)) {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(0, chunk.error.message || "The server reported an error.");
      yield chunk;
    }
  }
}
