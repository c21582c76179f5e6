// The chat page of `chatlm serve`: one conversation kept in this browser's localStorage, sent to the server's
// OpenAI-compatible /v1/chat/completions and streamed back. Replies render as markdown with markdown-it, whose
// `html: false` escapes any HTML a model writes (no script from a reply ever runs) and whose link check refuses
// javascript: and data: URLs.
import MarkdownIt from "markdown-it";

const md = new MarkdownIt({ html: false, linkify: true });
const defaultLinkOpen = md.renderer.rules.link_open || ((tokens, i, options, env, self) => self.renderToken(tokens, i, options));
md.renderer.rules.link_open = (tokens, i, options, env, self) => {
  tokens[i].attrSet("target", "_blank");
  tokens[i].attrSet("rel", "noopener noreferrer");
  return defaultLinkOpen(tokens, i, options, env, self);
};

const CHAT_KEY = "chatlm.chat";
const SETTINGS_KEY = "chatlm.settings";
const $ = (id) => document.getElementById(id);

// --- state kept in the browser -------------------------------------------------------------------------------
function loadJSON(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback; // a hand-edited or foreign value: start clean rather than break the page
  }
}

let chat = loadJSON(CHAT_KEY, []);
if (!Array.isArray(chat)) chat = [];
const settings = Object.assign({ system: "", temperature: "", maxTokens: "", apiKey: "" }, loadJSON(SETTINGS_KEY, {}));
let modelName = null;
let running = null; // the AbortController of the reply being streamed

const saveChat = () => localStorage.setItem(CHAT_KEY, JSON.stringify(chat));
const saveSettings = () => localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));

function headers() {
  const h = { "Content-Type": "application/json" };
  if (settings.apiKey) h.Authorization = `Bearer ${settings.apiKey}`;
  return h;
}

// --- rendering -------------------------------------------------------------------------------------------------
function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderMessage(message) {
  const box = element("div", `message ${message.role}`);
  if (message.role === "user") {
    box.append(element("div", "content", message.content));
    return box;
  }
  if (message.reasoning) {
    const details = element("details", "reasoning");
    details.append(element("summary", "", message.done ? "Thought" : "Thinking…"), element("div", "", message.reasoning));
    box.append(details);
  }
  const content = element("div", "content");
  content.innerHTML = md.render(message.content || "");
  for (const pre of content.querySelectorAll("pre")) {
    const copy = element("button", "copy", "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => navigator.clipboard?.writeText(pre.innerText));
    pre.before(copy);
  }
  box.append(content);
  for (const call of message.toolCalls || []) {
    box.append(element("div", "tool-call", `tool call: ${call.name}(${call.arguments})`));
  }
  if (message.error) box.append(element("div", "error", message.error));
  const stats = statsLine(message);
  if (stats) box.append(element("div", "stats", stats));
  return box;
}

function statsLine(message) {
  const parts = [];
  const s = message.stats;
  if (s) {
    parts.push(`${s.promptTokens} prompt tokens, ${s.completionTokens} reply tokens`);
    if (s.tokensPerSecond) parts.push(`${s.tokensPerSecond.toFixed(1)} tok/s`);
    if (s.firstTokenSeconds !== undefined) parts.push(`first token after ${s.firstTokenSeconds.toFixed(2)} s`);
  }
  if (message.finish === "length") parts.push("cut at the token limit");
  if (message.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function render() {
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.replaceChildren(...chat.map(renderMessage));
  if (atBottom) list.scrollTop = list.scrollHeight;
}

let frame = 0;
function renderSoon() {
  if (!frame) frame = requestAnimationFrame(() => { frame = 0; render(); });
}

function setRunning(controller) {
  running = controller;
  $("send").hidden = Boolean(controller);
  $("stop").hidden = !controller;
}

// --- talking to the server -------------------------------------------------------------------------------------
async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error?.message ?? JSON.stringify(body)}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (!response.ok) {
      $("model").textContent = response.status === 401 ? "needs an API key (Settings)" : await errorMessage(response);
      return;
    }
    modelName = (await response.json()).data[0].id;
    $("model").textContent = modelName;
  } catch (error) {
    $("model").textContent = `server unreachable: ${error.message}`;
  }
}

function requestMessages() {
  const messages = settings.system.trim() ? [{ role: "system", content: settings.system }] : [];
  for (const m of chat) {
    if (m.role === "assistant" && (m.error || !m.content)) continue; // a failed or empty reply is not the model's turn
    messages.push({ role: m.role, content: m.content });
  }
  return messages;
}

// Server-sent events: yields each `data:` payload as parsed JSON until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  chat.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "", reasoning: "", toolCalls: [] };
  chat.push(reply);
  saveChat();
  render();
  const controller = new AbortController();
  setRunning(controller);
  const body = { model: modelName ?? "default", messages: requestMessages(), stream: true, stream_options: { include_usage: true } };
  if (settings.temperature !== "") body.temperature = Number(settings.temperature);
  if (settings.maxTokens !== "") body.max_tokens = Number(settings.maxTokens);
  const start = performance.now();
  let first;
  let last;
  try {
    const response = await fetch("v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      reply.error = await errorMessage(response);
      return;
    }
    for await (const chunk of events(response)) {
      if (chunk.error) {
        reply.error = chunk.error.message;
        continue;
      }
      const choice = chunk.choices?.[0];
      if (choice) {
        const delta = choice.delta || {};
        if (delta.content || delta.reasoning_content || delta.tool_calls) {
          last = performance.now();
          first ??= last;
        }
        if (delta.content) reply.content += delta.content;
        if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
        for (const call of delta.tool_calls || []) {
          const known = (reply.toolCalls[call.index] ??= { name: "", arguments: "" });
          if (call.function?.name) known.name += call.function.name;
          if (call.function?.arguments) known.arguments += call.function.arguments;
        }
        if (choice.finish_reason) reply.finish = choice.finish_reason;
      }
      if (chunk.usage) {
        const n = chunk.usage.completion_tokens;
        reply.stats = {
          promptTokens: chunk.usage.prompt_tokens,
          completionTokens: n,
          firstTokenSeconds: first === undefined ? undefined : (first - start) / 1000,
          // decode speed: the tokens after the first over the time they took
          tokensPerSecond: n > 1 && last > first ? ((n - 1) * 1000) / (last - first) : undefined,
        };
      }
      renderSoon();
    }
  } catch (error) {
    if (error.name === "AbortError") reply.stopped = true;
    else reply.error = `the request failed: ${error.message}`;
  } finally {
    reply.done = true;
    setRunning(null);
    saveChat();
    render();
  }
}

// --- wiring ----------------------------------------------------------------------------------------------------
function bindSetting(id, key) {
  const input = $(id);
  input.value = settings[key];
  input.addEventListener("input", () => {
    settings[key] = input.value;
    saveSettings();
    if (key === "apiKey") loadModel();
  });
}

function start() {
  bindSetting("system", "system");
  bindSetting("temperature", "temperature");
  bindSetting("max-tokens", "maxTokens");
  bindSetting("api-key", "apiKey");
  $("toggle-settings").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("new-chat").addEventListener("click", () => {
    running?.abort();
    chat = [];
    saveChat();
    render();
  });
  $("stop").addEventListener("click", () => running?.abort());
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value;
    if (running || !text.trim()) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  for (const m of chat) m.done = true; // a reply cut by a closed tab is finished as far as this page goes
  render();
  loadModel();
}

start();
