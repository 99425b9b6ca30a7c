// What the page remembers lives in this browser's localStorage only: the conversations, the
// settings and the API key.  Nothing of it is sent anywhere but in the requests the page makes.

const CONVERSATIONS = "shimmy.conversations";
const PREFERENCES = "shimmy.preferences";
const API_KEY = "shimmy.apiKey";

function read(name, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(name));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

// Returns an error message when the browser refused to store (quota, private mode), else null.
function write(name, value) {
  try {
    localStorage.setItem(name, JSON.stringify(value));
    return null;
  } catch (error) {
    return `This browser did not keep the ${name.split(".")[1]}: ${error.message}`;
  }
}

// crypto.randomUUID needs a secure context; the page may be served over plain http to another host.
const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 10);

export const conversations = {
  load: () => read(CONVERSATIONS, []).filter((c) => c && Array.isArray(c.messages)),
  save: (list) => write(CONVERSATIONS, list),
  create: (model) => ({ id: newId(), title: "New chat", model, messages: [], updated: Date.now() }),
};

export const preferences = {
  load: () => ({ system: "", temperature: "", maxTokens: "", theme: "auto", model: "", ...read(PREFERENCES, {}) }),
  save: (prefs) => write(PREFERENCES, prefs),
};

export const apiKey = {
  get: () => read(API_KEY, ""),
  set: (key) => write(API_KEY, key),
};
