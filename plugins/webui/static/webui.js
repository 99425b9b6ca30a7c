// The chat page: a model picker, streamed replies with a stop button, reasoning and tool calls,
// settings, themes and the conversations of this browser.  See docs/webui.md.
import { ApiClient } from "./api_client.js";
import { apiKey, conversations as store, preferences } from "./conversation_store.js";
import { renderMarkdown } from "./markdown_view.js";

const $ = (id) => document.getElementById(id);
const el = {
  model: $("model"), messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"),
  notice: $("notice"), list: $("conversations"), newChat: $("new-chat"), theme: $("theme-toggle"),
  settingsToggle: $("settings-toggle"), settings: $("settings"), system: $("system-prompt"),
  temperature: $("temperature"), maxTokens: $("max-tokens"), codeLight: $("code-light"), codeDark: $("code-dark"),
  keyDialog: $("key-dialog"), keyReason: $("key-reason"), keyInput: $("key-input"), keySave: $("key-save"),
  keyCancel: $("key-cancel"),
};

const prefs = preferences.load();
const all = store.load();
let current = null;   // the conversation on screen (null: a new one, created by its first message)
let running = null;   // the AbortController of the reply that streams

function node(tag, className, text) {
  const made = document.createElement(tag);
  if (className) made.className = className;
  if (text !== undefined) made.textContent = text;
  return made;
}

function showNotice(text) {
  el.notice.textContent = text || "";
  el.notice.hidden = !text;
}

function persist() {
  all.sort((a, b) => b.updated - a.updated);
  const problem = store.save(all);
  if (problem) showNotice(problem);
  renderList();
}

function savePrefs() {
  const problem = preferences.save(prefs);
  if (problem) showNotice(problem);
}

// ------------------------------------------------------------------ theme
const THEMES = ["auto", "light", "dark"];

function applyTheme() {
  const theme = THEMES.includes(prefs.theme) ? prefs.theme : "auto";
  if (theme === "auto") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  el.codeLight.media = { auto: "(prefers-color-scheme: light)", light: "all", dark: "not all" }[theme];
  el.codeDark.media = { auto: "(prefers-color-scheme: dark)", light: "not all", dark: "all" }[theme];
  el.theme.textContent = `Theme: ${theme}`;
}

el.theme.addEventListener("click", () => {
  prefs.theme = THEMES[(THEMES.indexOf(prefs.theme) + 1) % THEMES.length];
  applyTheme();
  savePrefs();
});

// ------------------------------------------------------------------ settings
el.settingsToggle.addEventListener("click", () => {
  el.settings.hidden = !el.settings.hidden;
  el.settingsToggle.setAttribute("aria-expanded", String(!el.settings.hidden));
});
for (const [input, name] of [[el.system, "system"], [el.temperature, "temperature"], [el.maxTokens, "maxTokens"]]) {
  input.value = prefs[name];
  input.addEventListener("input", () => {
    prefs[name] = input.value;
    savePrefs();
  });
}

// ------------------------------------------------------------------ the API key
let keyAsked = null;   // while the dialog is open, every request that met a 401 waits for it

function askKey(reason) {
  if (keyAsked) return keyAsked;
  el.keyReason.textContent = reason;
  el.keyInput.value = "";
  keyAsked = new Promise((resolve) => {
    const done = (key) => {
      keyAsked = null;
      if (el.keyDialog.open) el.keyDialog.close();
      resolve(key || null);
    };
    el.keySave.onclick = () => done(el.keyInput.value.trim());
    el.keyCancel.onclick = () => done(null);
    el.keyInput.onkeydown = (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        done(el.keyInput.value.trim());
      }
    };
    el.keyDialog.oncancel = (event) => {
      event.preventDefault();
      done(null);
    };
  });
  el.keyDialog.showModal();
  el.keyInput.focus();
  return keyAsked;
}

const api = new ApiClient(apiKey, askKey);

// ------------------------------------------------------------------ models
async function loadModels() {
  try {
    const ids = await api.models();
    el.model.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (!ids.length) showNotice("This server has no model to chat with: start it with --model PATH.");
    const wanted = current?.model || prefs.model;
    if (ids.includes(wanted)) el.model.value = wanted;
  } catch (error) {
    showNotice(`The models could not be listed: ${error.message}`);
  }
}

el.model.addEventListener("change", () => {
  prefs.model = el.model.value;
  savePrefs();
});

// ------------------------------------------------------------------ messages
function userView(message) {
  const view = node("div", "message user");
  view.append(node("div", "role", "You"), node("div", "text", message.content));
  return view;
}

function toolCallView(call) {
  const view = node("div", "tool-call");
  view.append(node("span", "tool-name", `${call.name || "tool"}()`), node("pre", "tool-arguments", call.arguments));
  return view;
}

function statsText(message) {
  const parts = [];
  const stats = message.stats;
  if (stats) {
    parts.push(`${stats.prompt} prompt + ${stats.completion} completion tokens`);
    if (stats.rate) parts.push(`${stats.rate.toFixed(1)} tokens/s`);
  }
  if (message.stopped) parts.push("stopped");
  else if (message.finish === "length") parts.push("cut at the token limit");
  return parts.join(" · ");
}

// The view of an assistant message, and a function that brings it up to date with the message.
function assistantView(message) {
  const view = node("div", "message assistant");
  const role = node("div", "role");
  const reasoning = node("details", "reasoning");   // closed: the reasoning shows on a click
  const summary = node("summary", null, "Thinking");
  const reasoningText = node("div", "reasoning-text markdown");
  reasoning.append(summary, reasoningText);
  const content = node("div", "content markdown");
  const tools = node("div", "tool-calls");
  const meta = node("div", "meta");
  const error = node("div", "error");
  view.append(role, reasoning, content, tools, meta, error);
  const update = () => {
    role.textContent = message.model || "Assistant";
    reasoning.hidden = !message.reasoning;
    if (message.reasoning) renderMarkdown(reasoningText, message.reasoning);
    renderMarkdown(content, message.content);
    tools.replaceChildren(...(message.tool_calls || []).filter(Boolean).map(toolCallView));
    meta.textContent = statsText(message);
    meta.hidden = !meta.textContent;
    error.textContent = message.error || "";
    error.hidden = !message.error;
  };
  update();
  return { view, update };
}

function scrollDown() {
  el.messages.scrollTop = el.messages.scrollHeight;
}

function mergeToolCall(calls, part) {
  const index = Number.isInteger(part.index) ? part.index : calls.length;
  const call = calls[index] || (calls[index] = { id: "", name: "", arguments: "" });
  if (part.id) call.id = part.id;
  if (part.function?.name) call.name = part.function.name;
  if (part.function?.arguments) call.arguments += part.function.arguments;
}

function requestBody(history, model) {
  const messages = [];
  if (prefs.system.trim()) messages.push({ role: "system", content: prefs.system });
  for (const message of history) {
    if (message.role === "user" || (message.role === "assistant" && message.content)) {
      messages.push({ role: message.role, content: message.content });
    }
  }
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat(prefs.temperature);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  const maxTokens = parseInt(prefs.maxTokens, 10);
  if (Number.isFinite(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

function setRunning(controller) {
  running = controller;
  el.send.hidden = Boolean(controller);
  el.stop.hidden = !controller;
}

async function send() {
  const text = el.input.value.trim();
  const model = el.model.value;
  if (!text || running) return;
  if (!model) {
    showNotice("No model is selected.");
    return;
  }
  showNotice("");
  el.input.value = "";
  if (!current) {
    current = store.create(model);
    all.push(current);
  }
  const conversation = current;
  const user = { role: "user", content: text };
  conversation.messages.push(user);
  if (conversation.messages.length === 1) conversation.title = text.slice(0, 60);
  conversation.model = model;
  const history = conversation.messages.slice();
  const reply = { role: "assistant", content: "", reasoning: "", tool_calls: [], model };
  conversation.messages.push(reply);
  conversation.updated = Date.now();
  persist();
  const { view, update } = assistantView(reply);
  view.classList.add("streaming");
  el.messages.append(userView(user), view);
  scrollDown();

  const controller = new AbortController();
  setRunning(controller);
  const started = performance.now();
  let first = null;
  let usage = null;
  let frame = 0;
  const redraw = () => {
    if (!frame) frame = requestAnimationFrame(() => { frame = 0; update(); scrollDown(); });
  };
  try {
    for await (const chunk of api.chat(requestBody(history, model), controller.signal)) {
      if (chunk.usage) usage = chunk.usage;
      if (chunk.model) reply.model = chunk.model;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (first === null && (delta.content || delta.reasoning_content || delta.tool_calls)) first = performance.now();
      if (delta.content) reply.content += delta.content;
      if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
      for (const part of delta.tool_calls || []) mergeToolCall(reply.tool_calls, part);
      if (choice.finish_reason) reply.finish = choice.finish_reason;
      redraw();
    }
  } catch (error) {
    if (error.name === "AbortError") reply.stopped = true;
    else reply.error = error.message;
  } finally {
    cancelAnimationFrame(frame);
    if (usage) {
      // Generation speed: the tokens after the first, over the time from the first to the last
      // (none for a reply too short to time: a burst of a few chunks says nothing).
      const seconds = (performance.now() - (first ?? started)) / 1000;
      const rate = usage.completion_tokens > 1 && seconds >= 0.05 ? (usage.completion_tokens - 1) / seconds : 0;
      reply.stats = { prompt: usage.prompt_tokens, completion: usage.completion_tokens, rate };
    }
    setRunning(null);
    view.classList.remove("streaming");
    update();
    scrollDown();
    conversation.updated = Date.now();
    persist();
  }
}

function stop() {
  if (running) running.abort();
}

el.send.addEventListener("click", send);
el.stop.addEventListener("click", stop);
el.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && running) {
    event.preventDefault();
    stop();
  }
});

// ------------------------------------------------------------------ conversations
function renderList() {
  el.list.replaceChildren(...all.map((conversation) => {
    const item = node("li", conversation === current ? "current" : "");
    const open = node("button", "open", conversation.title);
    open.type = "button";
    open.title = conversation.title;
    open.addEventListener("click", () => openConversation(conversation));
    const remove = node("button", "delete", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", `Delete "${conversation.title}"`);
    remove.addEventListener("click", () => deleteConversation(conversation));
    item.append(open, remove);
    return item;
  }));
}

function openConversation(conversation) {
  current = conversation;
  el.messages.replaceChildren(...(conversation ? conversation.messages : []).map(
    (message) => (message.role === "user" ? userView(message) : assistantView(message).view)));
  if (conversation?.model && [...el.model.options].some((option) => option.value === conversation.model)) {
    el.model.value = conversation.model;
  }
  renderList();
  scrollDown();
  el.input.focus();
}

function deleteConversation(conversation) {
  all.splice(all.indexOf(conversation), 1);
  if (conversation === current) openConversation(null);
  persist();
}

el.newChat.addEventListener("click", () => openConversation(null));

applyTheme();
openConversation(all[0] || null);
loadModels().then(() => document.documentElement.setAttribute("data-ready", "true"));
